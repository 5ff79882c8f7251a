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
metrics.json to --out. Seeded; progress bars show the training, calibration and scoring.

The shipped adapter (selfsteer/agents/intervener/) was made as its README.md says (the rows it was
trained on are shipped beside it, in counterfactual.tar.gz).

examples:
  selfsteer intervener train --data runs/cf runs/cf-dagger --out runs/intervener
  selfsteer train --recipe small --supervisor intervener
"""


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="train the intervener (the embedded model + LoRA) on counterfactual decision data",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="fine-tune and score an adapter", description=DESCRIPTION,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    train.add_argument(
        "--data", nargs="+", required=True, metavar="DIR", help="folders from `decisions collect`"
    )
    train.add_argument(
        "--out", default="runs/intervener", help="where the adapter goes (default runs/intervener)"
    )
    train.add_argument(
        "--examples", type=int, default=960, help="training examples, equal per label (default 960)"
    )
    train.add_argument("--epochs", type=float, default=1.0, help="passes over the examples (default 1)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapter (default 1e-3)")
    train.add_argument(
        "--action-weight",
        type=float,
        default=30.0,
        help="weight of the action token against one explanation token (default 30)",
    )
    train.add_argument(
        "--strategy",
        choices=("intervener", "intervener_signals"),
        default="intervener",
        help="the prompt it learns to answer: intervener (a table of lr and losses per evaluation; default) "
        "or intervener_signals (the loss's recent moves in %%, its spread, the lr as multiples of its "
        "start: no absolute lr)",
    )
    train.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    train.add_argument("--validation-seeds", default="3", help="seeds whose rows are held out (default 3)")
    train.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    train.add_argument(
        "--calibration-rows",
        type=int,
        default=300,
        help="training rows scored to set the adapter's action bias after training (see `intervener "
        "calibrate`; default 300; 0: none)",
    )
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


def run(args: argparse.Namespace) -> int:
    from selfsteer.agents.intervener import IntervenerConfig, train_intervener

    if args.action == "calibrate":
        return _calibrate(args)

    config = IntervenerConfig(
        data=args.data,
        strategy=args.strategy,
        output_dir=args.out,
        max_examples=args.examples,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        action_weight=args.action_weight,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        validation_seeds=[int(s) for s in args.validation_seeds.split(",") if s.strip()],
        seed=args.seed,
        calibration_rows=args.calibration_rows,
    )
    try:
        metrics = train_intervener(config)
    except ValueError as error:
        print(f"selfsteer intervener train: {error}", file=sys.stderr)
        return 2
    validation = metrics["validation"]
    print(json.dumps({k: validation[k] for k in ("intervener", "keep", "rule", "labels")}, indent=1))
    print(f"adapter, card and metrics -> {args.out}")
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
