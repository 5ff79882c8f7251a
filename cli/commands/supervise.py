"""`selfsteer supervise --url URL`: the supervision loop against a run's control server."""

from __future__ import annotations

import argparse
import sys

import httpx

from selfsteer.agents.chat_models import describe_llm_error
from selfsteer.cli.commands.common import self_correction_from_args, supervisor_from_args
from selfsteer.graphs.supervise import refuse_unsupported, run_supervision
from selfsteer.trainer_bridge.client import BridgeClient, BridgeHTTPError


def run(args: argparse.Namespace) -> int:
    try:
        supervisor = supervisor_from_args(args)
        self_correct = self_correction_from_args(args)
        refuse_unsupported(supervisor, self_correct)
    except ValueError as error:
        print(f"selfsteer supervise: {error}", file=sys.stderr)
        return 2
    if supervisor is None:
        print("selfsteer supervise: --supervisor none supervises nothing", file=sys.stderr)
        return 2
    try:
        with BridgeClient(args.url, token=args.token) as client:
            state = client.state()
    except (httpx.HTTPError, BridgeHTTPError) as error:
        print(f"selfsteer supervise: cannot reach the run at {args.url}: {error}", file=sys.stderr)
        return 1
    print(f"supervising run {state.get('run_id')} at {args.url} with {supervisor.name}", flush=True)
    try:
        final = run_supervision(
            args.url,
            supervisor,
            db=args.db,
            token=args.token,
            max_iterations=args.max_iterations,
            every_steps=args.every_steps,
            self_correct=self_correct,
            on_decision=print_decision,
        )
    except Exception as error:
        print(f"selfsteer supervise: {describe_llm_error(error, args.llm, args.base_url)}", file=sys.stderr)
        return 1
    print(f"done after {final.get('iteration', 0)} decisions", end="")
    if args.self_correct:
        print(
            f"; {final.get('rollbacks', 0)} rolled back, {final.get('reverts', 0)} set back, "
            f"{final.get('extra_steps', 0)} steps abandoned",
            end="",
        )
    print()
    return 0


def print_decision(decision: dict) -> None:
    print(
        f"step {decision['step']}: {decision['action']}, lr {decision['lr_before']:.3g} -> "
        f"{decision['lr_after']:.3g}: {decision['explanation']}",
        flush=True,
    )
