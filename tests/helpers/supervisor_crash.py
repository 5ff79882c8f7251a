"""A supervisor process for the crash tests: supervises the run at --url with a scripted supervisor, and
kills itself with SIGKILL (no clean-up, no exception handlers, no atexit) right after the --nth call of
one method inside one node of the supervision graph, e.g. `act:set_lr` = just after the lr command
reached the server, before LangGraph checkpointed the node.

    python tests/helpers/supervisor_crash.py --url URL --db DB --kill-after decide:record_decision --nth 1
"""

from __future__ import annotations

import argparse
import functools
import os
import signal

from selfsteer.agents.supervisors import Decision, Supervisor
from selfsteer.graphs.supervise import SelfCorrection, run_supervision
from selfsteer.tools.bridge_tools import BridgeTools
from selfsteer.trainer_bridge.client import BridgeClient

# node:method -> the class whose method is the kill point. Each method is called in that node only
# (read_metrics with names=... only in `wait`).
KILL_POINTS = {
    "observe:pause": BridgeTools,
    "observe:update_decision": BridgeClient,
    "decide:record_decision": BridgeClient,
    "act:set_lr": BridgeTools,
    "act:resume": BridgeTools,
    "wait:read_metrics": BridgeTools,
    "check:load_checkpoint": BridgeClient,  # the rollback reached the server (with --self-correct)
}


class Alternating(Supervisor):
    """double, halve, double, ... by the step it sees: never keep, so every decision sends a command."""

    name = "alternating"

    def decide(self, observation):
        action = "double" if (observation.step // 5) % 2 == 0 else "halve"
        return Decision(action, f"scripted at step {observation.step}")


class AlwaysDouble(Supervisor):
    """Doubles whatever it sees: from a high lr, a decision self-correction fails and rolls back."""

    name = "always-double"

    def decide(self, observation):
        return Decision("double", f"scripted at step {observation.step}")


def die_after(cls: type, method: str, nth: int, only_if=None) -> None:
    original = getattr(cls, method)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        if only_if is None or only_if(*args, **kwargs):
            calls += 1
            if calls == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, method, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--kill-after", choices=sorted(KILL_POINTS))
    parser.add_argument("--nth", type=int, default=1)
    parser.add_argument("--max-iterations", type=int, default=100)
    parser.add_argument("--self-correct", action="store_true", help="always double, under self-correction")
    args = parser.parse_args()
    if args.kill_after:
        method = args.kill_after.split(":")[1]
        only_if = (
            (lambda self, since=None, names=None, branch=None: names is not None)
            if method == "read_metrics"
            else None
        )
        die_after(KILL_POINTS[args.kill_after], method, args.nth, only_if)
    run_supervision(
        args.url,
        AlwaysDouble() if args.self_correct else Alternating(),
        db=args.db,
        max_iterations=args.max_iterations,
        thread_id="crash-test",
        pause_while_deciding=True,
        self_correct=SelfCorrection(max_extra_steps=1.0) if args.self_correct else None,
    )


if __name__ == "__main__":
    main()
