"""Does every server accept a connection the instant it prints its URL?

For each server command (`selfsteer dashboard`, `selfsteer serve-llm`, `selfsteer train`) this starts the
real command N times in a row, reads its stdout until the URL line appears (stderr is read apart: a
warning printed first must not matter), connects to that port at once and sends one HTTP request.
A refused or failed connection counts. Prints one line per server and exits 1 if any was refused.

    .venv/bin/python -m selfsteer.evals.bench.listen_race --trials 20

Each trial is a fork of this process taken after the imports, so a trial costs the command's own
start-up (binding, opening the store, loading the model, building the run), not Python's imports:
that start-up is where the race lived (uvicorn calls listen() some 200 ms after it starts).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn  # noqa: F401  (the imports every trial would pay, paid once before the forks)

import selfsteer.trainer_bridge.server  # noqa: F401
from selfsteer.cli.main import build_parser
from selfsteer.cli.main import main as selfsteer_main
from selfsteer.trainer_bridge.store import Store

URL = re.compile(rb"http://127\.0\.0\.1:(\d+)")


def server_commands(workdir: Path) -> dict[str, list[str]]:
    db = workdir / "history.sqlite"
    with Store(db) as store:
        store.create_run("listen-race")
    return {
        "dashboard": ["dashboard", "--db", str(db), "--port", "0"],
        "serve-llm": ["serve-llm", "--port", "0"],
        "train": [
            "train", "--recipe", "tiny", "--port", "0", "--set", "training.max_steps=100000",
            "--db", str(workdir / "train.sqlite"), "--out", str(workdir / "train"),
        ],
    }  # the train command as a user types it # fmt: skip


def trial(argv: list[str], timeout: float = 120.0) -> tuple[bool, str, float]:
    """Start `selfsteer ARGV` in a forked child; connect when its URL line appears.
    Returns (accepted, what happened, seconds from start to the URL line)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the command, its stdout and stderr on the pipes
        code = 1
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            print("warning: a line on stderr before anything else", file=sys.stderr, flush=True)
            code = selfsteer_main(argv)
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    # stderr is drained on its own, so a chatty child never blocks on a full pipe.
    threading.Thread(target=lambda: _drain(err_r), daemon=True).start()
    try:
        port, seen = _read_url(out_r, start + timeout)
        elapsed = time.monotonic() - start
        if port is None:
            return False, f"no URL line within {timeout:.0f} s (stdout: {seen[-300:]!r})", elapsed
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                conn.settimeout(30)
                head = conn.recv(64)
        except OSError as exc:
            return False, f"{type(exc).__name__}: {exc}", elapsed
        if not head.startswith(b"HTTP/1.1 "):
            return False, f"not an HTTP answer: {head!r}", elapsed
        return True, head.split(b"\r\n", 1)[0].decode(), elapsed
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(out_r)


def _read_url(fd: int, deadline: float) -> tuple[int | None, bytes]:
    seen = b""
    while time.monotonic() < deadline:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk
        for line in seen.split(b"\n")[:-1]:  # whole lines only
            match = URL.search(line)
            if match:
                return int(match.group(1)), seen
    return None, seen


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="starts per server (default: 20)")
    parser.add_argument(
        "--servers", default="dashboard,serve-llm,train", help="which (default: dashboard,serve-llm,train)"
    )
    args = parser.parse_args(argv)

    # The rest of what every trial would pay, paid once here (the commands import these lazily).
    build_parser()  # imports every command's module

    refused_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        commands = server_commands(Path(tmp))
        for name in args.servers.split(","):
            if name not in commands:
                parser.error(f"unknown server {name!r} (known: {', '.join(commands)})")
            if name == "serve-llm":
                # lazy: torch, paid only when this server is raced
                import selfsteer.agents.llm.engine  # noqa: F401
                import selfsteer.agents.llm.openai_server  # noqa: F401
            if name == "train":
                import selfsteer.trainer_bridge.runner  # noqa: F401  (lazy: torch, as above)
            refusals, times = [], []
            for _ in range(args.trials):
                accepted, what, elapsed = trial(commands[name])
                times.append(elapsed)
                if not accepted:
                    refusals.append(what)
            refused_total += len(refusals)
            times.sort()
            print(
                f"{name}: {args.trials} starts, {len(refusals)} refused"
                f" (URL line after {times[len(times) // 2]:.2f} s median)"
                + "".join(f"\n  {what}" for what in refusals),
                flush=True,
            )
    return 1 if refused_total else 0


if __name__ == "__main__":
    sys.exit(main())
