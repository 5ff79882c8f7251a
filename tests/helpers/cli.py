"""Running the `selfsteer` command line as a user does: a fresh interpreter, output captured."""

import subprocess
import sys


def selfsteer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `selfsteer ARGS`; fails the test, with the end of stderr, unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "selfsteer.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done
