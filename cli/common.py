"""Arguments several commands share."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

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


def chat_model_from_args(args: argparse.Namespace):
    from selfsteer.agents.chat_models import make_chat_model

    return make_chat_model(args.llm, base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)


def add_supervisor_arguments(parser: argparse.ArgumentParser, default: str | None = "rule") -> None:
    group = parser.add_argument_group("supervisor")
    group.add_argument(
        "--supervisor",
        default=default,
        help="who steers the run: none | rule (loss rises or plateaus -> halve) | plateau (PyTorch's "
        "ReduceLROnPlateau) | llm (a language model, see --llm and --strategy; llm:STRATEGY names the strategy) | intervener (the embedded "
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
        help="decide at least every N steps, not only after evaluations (default 0: after evaluations)",
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


def supervisor_from_args(args: argparse.Namespace):
    """The Supervisor the flags ask for, or None for `none`."""
    from selfsteer.agents.registry import make_supervisor, needs_chat_model

    chat_model = chat_model_from_args(args) if needs_chat_model(args.supervisor) else None
    return make_supervisor(args.supervisor, chat_model=chat_model, strategy=args.strategy)


def self_correction_from_args(args: argparse.Namespace):
    """The SelfCorrection the flags ask for, or None without --self-correct."""
    from selfsteer.graphs.supervise import SelfCorrection

    if not getattr(args, "self_correct", False):
        given = [flag for flag, value in (("--self-correct-margin", args.self_correct_margin),
                 ("--self-correct-budget", args.self_correct_budget), ("--reflector", args.reflector),
                 ("--remember-reflections", args.remember_reflections or None)) if value is not None]  # fmt: skip
        if given:
            raise ValueError(f"{', '.join(given)}: only with --self-correct")
        return None
    options = {
        "margin": args.self_correct_margin,
        "max_extra_steps": args.self_correct_budget,
        "reflector": args.reflector,
    }
    return SelfCorrection(
        **{k: v for k, v in options.items() if v is not None}, remember_runs=args.remember_reflections
    )


def supervisor_thread_from_args(
    args: argparse.Namespace, db: str, pause_while_deciding: bool = False, thread_id: str | None = None
):
    """What `selfsteer train` runs beside training: a callable `(control, stop_event)` that supervises
    the run in process (a `LocalRunControl`: no HTTP) until it ends, or None for `--supervisor none`. A supervisor that crashes
    is reported and the run goes on with its current settings."""
    from selfsteer.graphs.supervise import refuse_unsupported

    supervisor = supervisor_from_args(args)
    if supervisor is None:
        return None
    self_correct = self_correction_from_args(args)  # bad flags are refused now, not in the thread
    refuse_unsupported(supervisor, self_correct)

    def supervise(run, stop_event):
        from selfsteer.graphs.supervise import run_supervision

        try:
            run_supervision(
                run, supervisor, db=db, token=getattr(args, "token", None), stop_event=stop_event,
                max_iterations=args.max_iterations, every_steps=args.every_steps,
                pause_while_deciding=pause_while_deciding, thread_id=thread_id, self_correct=self_correct,
            )  # fmt: skip
        except Exception:
            print("supervisor crashed; training goes on with its current settings:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)

    return supervise
