"""`selfsteer train` with one extra command, `hold`, for the crash test: its handler blocks the training
thread at a step boundary until the file named by $SELFSTEER_TEST_RELEASE exists (a hold the test
controls, where a slow evaluation was a race with the machine's speed). Everything else is the real CLI.

    SELFSTEER_TEST_RELEASE=/tmp/x python tests/helpers/held_train.py train --port 0 --recipe tiny ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from selfsteer.cli.main import main
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
