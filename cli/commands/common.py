"""What several commands build from the flags of cli/common.py: the chat model, the supervisor, the
self-correction, the supervisor's thread beside training."""

from __future__ import annotations

import argparse
import sys
import traceback

from selfsteer.agents.chat_models import make_chat_model
from selfsteer.agents.registry import make_supervisor, needs_chat_model
from selfsteer.graphs.supervise import SelfCorrection, refuse_unsupported, run_supervision


def chat_model_from_args(args: argparse.Namespace):
    return make_chat_model(args.llm, base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)


def supervisor_from_args(args: argparse.Namespace):
    """The Supervisor the flags ask for, or None for `none`."""
    chat_model = chat_model_from_args(args) if needs_chat_model(args.supervisor) else None
    return make_supervisor(args.supervisor, chat_model=chat_model, strategy=args.strategy)


def self_correction_from_args(args: argparse.Namespace):
    """The SelfCorrection the flags ask for, or None without --self-correct."""
    if not getattr(args, "self_correct", False):
        given = [
            flag
            for flag, value in (
                ("--self-correct-margin", args.self_correct_margin),
                ("--self-correct-budget", args.self_correct_budget),
                ("--reflector", args.reflector),
                ("--remember-reflections", args.remember_reflections or None),
            )
            if value is not None
        ]
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
    supervisor = supervisor_from_args(args)
    if supervisor is None:
        return None
    self_correct = self_correction_from_args(args)  # bad flags are refused now, not in the thread
    refuse_unsupported(supervisor, self_correct)

    def supervise(run, stop_event):
        try:
            run_supervision(
                run, supervisor, db=db, token=getattr(args, "token", None), stop_event=stop_event,
                max_iterations=args.max_iterations, every_steps=args.every_steps,
                pause_while_deciding=pause_while_deciding, thread_id=thread_id, self_correct=self_correct,
            )  # the supervise flags, passed through # fmt: skip
        except Exception:
            print("supervisor crashed; training goes on with its current settings:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)

    return supervise
