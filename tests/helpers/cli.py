"""Running the `selfsteer` command line as a user does: a fresh interpreter, output captured; or, for a
command whose process is not what a test is about, through the same entry point in this process."""

import contextlib
import io
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


def selfsteer_here(*args: str) -> str:
    """Runs `selfsteer ARGS` through its entry point (`cli.main.main`, what the console script calls) in
    this process, and returns what it printed; fails the test unless it exits 0. A fresh interpreter
    spends about 5 s importing torch and transformers, which a test process already has. For commands
    that close what they open (a train run's server and supervisor end with it) and set no signal
    handler, where the process is not what the test is about."""
    from selfsteer.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, (code, err.getvalue()[-3000:])
    return out.getvalue()


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
