"""Arguments several commands share (the parser side: nothing heavy is imported here; what commands
build from these flags is in cli/commands/common.py)."""

from __future__ import annotations

import argparse
import os

from selfsteer.prompts import list_strategies  # the prompts/lr_*.yaml files (light: no model)


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language model")
    group.add_argument(
        "--llm",
        default=os.environ.get("SELFSTEER_LLM", "local"),
        help="'local' (the embedded SmolLM2-135M-Instruct, default) or 'openai:MODEL' for any "
        "OpenAI-compatible endpoint (default: $SELFSTEER_LLM or local)",
    )
    group.add_argument(
        "--base-url",
        default=None,
        help="endpoint of an OpenAI-compatible server, e.g. http://127.0.0.1:8008/v1 "
        "(default: $SELFSTEER_BASE_URL or $OPENAI_BASE_URL, else OpenAI's)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="API key for --llm openai:MODEL (default: $SELFSTEER_API_KEY or $OPENAI_API_KEY)",
    )
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per LLM request (default 60)")


def add_ray_arguments(parser: argparse.ArgumentParser, description: str) -> argparse._ArgumentGroup:
    """--ray, --ray-address, --ray-cpus, --cpus-per-trial, --max-concurrent: many runs as Ray Tune trials
    (evals/ray_trials.py). Nothing of Ray is imported here."""
    group = parser.add_argument_group("Ray Tune", description)
    group.add_argument(
        "--ray", action="store_true", help="run on Ray Tune (default: one run after the other here)"
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="a Ray cluster (default $RAY_ADDRESS, else Ray started on this machine)",
    )
    group.add_argument("--ray-cpus", type=int, default=None, help="CPUs of a Ray started here (default: all)")
    group.add_argument(
        "--cpus-per-trial", type=float, default=1, help="CPUs (and torch threads) per run (default 1)"
    )
    group.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="runs at once at most (default: as many as the CPUs fit)",
    )
    return group


def add_supervisor_arguments(parser: argparse.ArgumentParser, default: str | None = "rule") -> None:
    group = parser.add_argument_group("supervisor")
    group.add_argument(
        "--supervisor",
        default=default,
        help="who steers the run: none | rule (loss rises or plateaus -> halve) | plateau (PyTorch's "
        "ReduceLROnPlateau) | probe (decides from evidence: x1 and one candidate lr trained a few steps from an "
        "exact snapshot before each decision, within half the run's steps; probe:full probes x0.5, x1 and x2) | "
        "probe-llm (the probe proposes, a chat model confirms or vetoes) | hypergradient (the update "
        "alignment's sign: agreeing steps double, opposing ones halve) | llm (a language model, see --llm and "
        "--strategy; llm:STRATEGY names the strategy) | intervener (the embedded "
        "model with the shipped adapter trained on counterfactual decisions; intervener:DIR for another "
        "adapter) | tools (a chat model with tool calling acts through the bridge's tools: lr, clipping, "
        "checkpoints, evaluation; needs --llm openai:MODEL with tools) | human (asks on the terminal) | module:Class (your own Supervisor) | "
        "a name registered under the entry-point group selfsteer.supervisors",
    )
    group.add_argument(
        "--strategy",
        default="json_history",
        help=f"prompt strategy of --supervisor llm: {', '.join(list_strategies())} (default json_history), "
        "or a .yaml file",
    )
    group.add_argument("--max-iterations", type=int, default=100, help="cap on decisions (default 100)")
    group.add_argument(
        "--every-steps",
        type=int,
        default=0,
        help="decide at least every N steps, not only after evaluations (default 0: after evaluations). The "
        "count is read as the run goes: a run is held only at its evaluations, so a run faster than the "
        "supervisor's look (every 0.2 s) can pass N steps unseen",
    )
    group.add_argument(
        "--self-correct",
        action="store_true",
        help="check each learning-rate change at the next evaluation; when the eval loss rose more than "
        "the margin, the supervisor reflects on why (or a reflector, see --reflector), the run rolls back "
        "to a checkpoint saved just before the change (as a new branch) and the decision is taken again "
        "without that action",
    )
    group.add_argument(
        "--self-correct-margin",
        type=float,
        default=None,
        help="with --self-correct: the rise of the eval loss, as a fraction, that fails a decision (default 0.02)",
    )
    group.add_argument(
        "--self-correct-budget",
        type=float,
        default=None,
        help="with --self-correct: the most training steps rollbacks may abandon, as a fraction of the "
        "run's max_steps (default 0.25); a failure past it only sets the learning rate back",
    )
    group.add_argument(
        "--reflector",
        default=None,
        help="with --self-correct: who reflects on a failed decision and retries it: self (default: the "
        "supervisor itself; always so for human), shipped (the trained reflector, agents/reflector/, and "
        "its actor, the embedded model; no gain measured in the lr-suite, docs/reflector/), none (the "
        "untrained embedded model as the reflector), or an adapter or model folder",
    )
    group.add_argument(
        "--remember-reflections",
        action="store_true",
        help="with --self-correct: show later runs the reflections of earlier ones (from the store)",
    )


def add_config_command(actions, name: str, help: str) -> None:
    """A sub-command whose flags are the fields of a config dataclass, parsed in `run` by TRL's parser
    (cli/commands/config_parser.py: building that parser imports torch, transformers and TRL, so
    `selfsteer --help` does not build it). This parser only collects the arguments, all of them and in
    order, `--help` included: its prefix character is one no argument starts with, so every argument counts
    as positional (argparse would refuse `--data` leading a REMAINDER)."""
    command = actions.add_parser(name, help=help, add_help=False, prefix_chars="\0")
    command.add_argument("args", nargs=argparse.REMAINDER)
