"""Running the `selfsteer` command line as a user does: a fresh interpreter, output captured."""

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator


def selfsteer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `selfsteer ARGS`; fails the test, with the end of stderr, unless it exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "selfsteer.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@contextlib.contextmanager
def served_dashboard(db) -> Iterator[str]:
    """`selfsteer dashboard --db DB --port 0` in a process of its own; yields its URL once it prints it
    (it listens before it does), and ends it afterwards."""
    server = subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "dashboard", "--db", str(db), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # warnings go there; the URL line is on stdout
        text=True,
    )
    try:
        printed = []
        for line in server.stdout:
            printed.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
                break
        else:
            raise AssertionError(f"no URL line (exit code {server.wait()}): {printed}")
        yield match.group(1)
    finally:
        server.terminate()
        server.wait(10)
