"""`selfsteer intervener train`: fine-tune the embedded model into an intervener on counterfactual data."""

from __future__ import annotations

import argparse

from selfsteer.agents.intervener_data import BASELINES
from selfsteer.cli.common import add_config_command

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
    # IntervenerConfig's fields, parsed by TRL's parser when it runs
    add_config_command(actions, "train", help="fine-tune and score an adapter (--help: every flag)")
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
    validate = actions.add_parser(
        "validate",
        help="score supervisors on labelled decision rows: accuracy, regret",
        description="Scores policies on counterfactual rows (`decisions collect`; label: the best action at "
        "the rows' horizon, keep unless another beats it by the noise margin the rows' own noise branches "
        "measure): accuracy against the label with a 95% Wilson interval, mean regret of the chosen action "
        "(relative to the best action's eval loss, capped at 1), and the actions chosen. The model-free "
        "policies decide from each row's observation: `hypergradient` from its update alignment, "
        "`probe:full` from its probe table (rows collected with --probe; without one it keeps). Writes "
        "--out (JSON) and prints a table.",
    )
    validate.add_argument(
        "--data", nargs="+", required=True, metavar="DIR", help="folders from `decisions collect`"
    )
    validate.add_argument("--seeds", default=None, help="only the rows of these seeds (default: every row)")
    validate.add_argument(
        "--adapter",
        default="intervener",
        help="the intervener to score: intervener (the shipped adapter, default), an adapter folder, or none",
    )
    validate.add_argument(
        "--policies",
        default=",".join(BASELINES),
        help=f"model-free supervisors to score beside it (default {','.join(BASELINES)})",
    )
    validate.add_argument("--out", default=None, help="write the scores here (JSON)")
