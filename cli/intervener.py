"""`selfsteer intervener train`: fine-tune the embedded model into an intervener on counterfactual data."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Fine-tunes SmolLM2-135M-Instruct with a LoRA adapter (TRL SFT, completion-only loss) to answer the
`intervener` prompt with the labelled decision of each collected decision point (see `selfsteer decisions
collect` and `decisions export --counterfactual`), then scores it on the rows of the validation seeds
against their labels and outcomes, beside "always keep" and the rule supervisor. Before scoring it is
calibrated: its mean answer on training rows sets a bias per action (calibration.json; see `intervener
calibrate`). Writes the adapter (float16 safetensors), calibration.json, README.md (its card) and
metrics.json to --output_dir. Seeded; progress bars show the training, calibration and scoring.

The shipped adapter (selfsteer/agents/intervener/) was made as its README.md says (the rows it was
trained on are shipped beside it, in counterfactual.tar.gz).
"""

EXAMPLES = """\
examples:
  selfsteer intervener train --data runs/cf runs/cf-dagger --output_dir runs/intervener
  selfsteer intervener train --config intervener.yaml --max_examples 1440
  selfsteer train --recipe small --supervisor intervener
"""

TRAIN_DESCRIPTION = f"""\
{DESCRIPTION}
Every field of IntervenerConfig (selfsteer.agents.intervener: TRL's SFTConfig with the intervener's
defaults) is a flag of its own name, parsed by TRL's TrlParser: --config FILE.yaml sets any of them (a
mapping of field names), and flags on the command line win over the file. The intervener's own fields
(listed last): --data (required), --strategy, --validation_seeds, --validation_rows, --max_examples,
--lora_r, --lora_alpha, --lora_dropout, --action_weight, --calibration_rows; SFTConfig's, with the
intervener's defaults: --output_dir, --learning_rate, --num_train_epochs, --seed, ...

{EXAMPLES}"""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="train the intervener (the embedded model + LoRA) on counterfactual decision data",
        description=f"{DESCRIPTION}\n{EXAMPLES}  selfsteer intervener train --help   # every flag\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    # `train` takes IntervenerConfig's fields, parsed in `run` by TRL's parser (building that parser imports
    # torch, transformers and TRL, so `selfsteer --help` does not build it). This parser only collects the
    # arguments, all of them and in order, `--help` included: its prefix character is one no argument starts
    # with, so every argument counts as positional (argparse would refuse `--data` leading a REMAINDER).
    train = actions.add_parser(
        "train",
        help="fine-tune and score an adapter (--help: every flag)",
        add_help=False,
        prefix_chars="\0",
    )
    train.add_argument("args", nargs=argparse.REMAINDER)
    calibrate = actions.add_parser(
        "calibrate",
        help="(re)compute an adapter's action bias",
        description="Scores the adapter on a seeded sample of training rows (those of seeds other than "
        "--validation-seeds) and writes calibration.json: each action's log-probability gets -log(its mean "
        "probability), so an action the adapter favours whatever the prompt loses that head start. "
        "`intervener train` does this at its end; this redoes it for an existing adapter.",
    )
    calibrate.add_argument("--adapter", required=True, help="the adapter folder")
    calibrate.add_argument(
        "--data", nargs="+", required=True, metavar="DIR", help="folders from `decisions collect`"
    )
    calibrate.add_argument("--rows", type=int, default=300, help="training rows to score (default 300)")
    calibrate.add_argument(
        "--validation-seeds", default="3", help="seeds whose rows are left out (default 3)"
    )
    calibrate.add_argument(
        "--seed", type=int, default=0, help="the training seed (the sample draws from seed + 1)"
    )


def train_parser():
    """TRL's parser of IntervenerConfig, with `--config FILE.yaml` (imports torch, transformers and TRL)."""
    from trl import TrlParser

    from selfsteer.agents.intervener import IntervenerConfig

    class Parser(TrlParser):
        def error(self, message):  # the message without the usage of 200 flags
            self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag)\n")

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = Parser(
        (IntervenerConfig,),
        prog="selfsteer intervener train",
        description=TRAIN_DESCRIPTION,
        formatter_class=Formatter,
    )
    # TrlParser reads `--config FILE` itself (before the other flags); declared here for --help only.
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="a YAML mapping of field names to values; the command line's flags win over it",
    )
    return parser


def parse_train_args(argv: list[str]):
    """`selfsteer intervener train`'s arguments as an IntervenerConfig: the fields from `--config FILE.yaml`,
    then the command line's flags over them. Exits 2 (argparse's way) with a message on stderr for an
    unknown flag or YAML key, an unreadable YAML file, a bad value, or no --data; exits 0 after --help."""
    import yaml

    parser = train_parser()
    argv = list(argv)
    for i, arg in enumerate(argv):  # TrlParser reads `--config FILE`, not `--config=FILE`
        if arg.startswith("--config="):
            argv[i : i + 1] = ["--config", arg.split("=", 1)[1]]
            break
    if argv.count("--config") > 1:
        parser.error("--config given more than once")
    if argv and argv[-1] == "--config":
        parser.error("argument --config: expected a YAML file")
    try:
        config, *_, from_file, from_command_line = parser.parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except OSError as error:
        parser.error(f"--config: cannot read {error.filename}: {error.strerror}")
    except yaml.YAMLError as error:
        parser.error(f"--config: not YAML: {error}")
    except ValueError as error:  # a YAML file that is not a mapping, a bad value of a field
        parser.error(str(error))
    if from_command_line:
        parser.error(f"unrecognized arguments: {' '.join(from_command_line)}")
    if from_file:  # TrlParser hands back each unknown key as `--KEY VALUE`
        unknown = ", ".join(key.removeprefix("--") for key in from_file[::2])
        parser.error(
            f"--config {argv[argv.index('--config') + 1]}: not fields of IntervenerConfig: {unknown}"
        )
    if not config.data:
        parser.error(
            "--data is required (folders from `selfsteer decisions collect`), as a flag or in --config"
        )
    return config


def run(args: argparse.Namespace) -> int:
    if args.action == "calibrate":
        return _calibrate(args)

    config = parse_train_args(args.args)
    from selfsteer.agents.intervener import train_intervener

    try:
        metrics = train_intervener(config)
    except ValueError as error:
        print(f"selfsteer intervener train: {error}", file=sys.stderr)
        return 2
    validation = metrics["validation"]
    print(json.dumps({k: validation[k] for k in ("intervener", "keep", "rule", "labels")}, indent=1))
    print(f"adapter, card and metrics -> {config.output_dir}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfsteer.agents.intervener import IntervenerConfig, calibrate, calibration_sample, split
    from selfsteer.agents.intervener_data import read_rows

    if not (Path(args.adapter) / "adapter_config.json").is_file():
        print(f"selfsteer intervener calibrate: {args.adapter} is not an adapter folder", file=sys.stderr)
        return 2
    try:
        rows = read_rows(args.data)
    except ValueError as error:
        print(f"selfsteer intervener calibrate: {error}", file=sys.stderr)
        return 2
    config = IntervenerConfig(
        validation_seeds=[int(s) for s in args.validation_seeds.split(",") if s.strip()]
    )
    train_rows, _ = split(rows, config)
    if not train_rows:
        print("selfsteer intervener calibrate: no training rows in --data", file=sys.stderr)
        return 2
    bias = calibrate(args.adapter, calibration_sample(train_rows, args.rows, args.seed))
    print(json.dumps({"choice_bias": {"action": bias}}, indent=1))
    print(f"-> {Path(args.adapter) / 'calibration.json'}")
    return 0
