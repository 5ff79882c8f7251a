"""`selfsteer demo`: one live learning-rate decision by the language model on a diverging run.

The training half (a real run steered by the model) is `selfsteer train`; this command shows the
decision step alone: what the supervisor sees, what it answers, how long it takes."""

from __future__ import annotations

from selfsteer.cli.common import add_llm_arguments

# A run started at too high a learning rate: the loss falls, then climbs.
DIVERGING_HISTORY = [
    (50, 3.42, 3.51),
    (100, 2.97, 3.05),
    (150, 3.10, 3.21),
    (200, 3.65, 3.80),
    (250, 4.47, 4.62),
]
SYSTEM_PROMPT = (
    "You supervise the training of a language model. Every few steps you see its losses and decide "
    "whether to double, halve or keep the learning rate."
)


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="one live learning-rate decision by the LLM on a diverging run",
        description="Ask the language model (the embedded one by default) for one structured decision "
        "(double / halve / keep the learning rate, with an explanation) on the loss history of a run "
        "that diverges, print it with its latency, and store it in the store's decisions table.",
    )
    add_llm_arguments(parser)
    parser.add_argument("--db", default=None, help="store file (default ./selfsteer.sqlite)")
    parser.add_argument(
        "--lr", type=float, default=5e-3, help="the run's current learning rate (default 5e-3)"
    )
