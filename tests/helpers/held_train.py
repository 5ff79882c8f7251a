"""`selfsteer train` with two things for the crash test, both under the test's control rather than the
machine's speed:
- a command, `hold`: its handler blocks the training thread at a step boundary until the file named by
  $SELFSTEER_TEST_RELEASE exists (where a slow evaluation was a race);
- $SELFSTEER_TEST_PAUSE_AT=N: the run pauses itself at the step boundary whose step is N, as a `pause` command
  applied there would (where a test that paused a fast run by request found it already finished).
Everything else is the real CLI.

    SELFSTEER_TEST_RELEASE=/tmp/x SELFSTEER_TEST_PAUSE_AT=30 python tests/helpers/held_train.py train ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from selfsteer.cli.main import main
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.commands import CommandError, NoArgs
from selfsteer.trainer_bridge.handlers import BUILTINS

HOLD_LIMIT_S = 300.0  # a test that never releases still ends


@BUILTINS.register("hold", NoArgs, "Tests only: block the training thread until the release file exists.")
def hold(ctx, args: NoArgs) -> dict:
    release = Path(os.environ["SELFSTEER_TEST_RELEASE"])
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not release.exists():
        if time.monotonic() > deadline:
            raise CommandError(f"{release} never appeared")
        time.sleep(0.02)
    return {"held_at": ctx.step}


_boundary = Bridge.boundary


def boundary(self: Bridge, ctx) -> None:
    if ctx.step == int(os.environ.get("SELFSTEER_TEST_PAUSE_AT", "-1")):
        self.paused = True  # held here, applying commands, until a `resume` (or the kill)
    _boundary(self, ctx)


Bridge.boundary = boundary


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
