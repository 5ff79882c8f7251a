"""Latency of the command line's help, measured as a user sees it: `selfsteer --help` and each
`selfsteer CMD --help` in a fresh process, N runs each, the median wall time (and the slowest) printed.

    .venv/bin/python -m selfsteer.evals.bench.cli [--n 5] [--commands train,eval]

The help needs no model, so it should not load one: the command modules import torch, transformers,
LangChain and the rest only in the code that runs a command (tests/test_cli_help.py checks that).
Measured on the shared 2-core machine: `selfsteer --help` 6.4 s when the parser imported every
command's dependencies, 0.09 s once it did not. Figures on a shared machine vary from run to run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from selfsteer.cli.main import COMMANDS

# Subcommands with their own help, besides the top-level commands (`intervener train --help` is TRL's
# parser of IntervenerConfig: it imports torch, as `trl sft --help` does).
NESTED = ("decisions collect", "decisions export", "intervener train", "eval lr-suite")


def selfsteer_command() -> list[str]:
    """The installed `selfsteer` script beside this interpreter (what a user runs), else `-m`."""
    script = Path(sys.executable).parent / "selfsteer"
    if script.exists():
        return [str(script)]
    found = shutil.which("selfsteer")
    return [found] if found else [sys.executable, "-m", "selfsteer.cli.main"]


def time_help(args: list[str], n: int) -> list[float]:
    """Wall seconds of n runs of `selfsteer ARGS --help`; each must exit 0."""
    command = [*selfsteer_command(), *args, "--help"]
    env = {**os.environ, "COLUMNS": "100"}
    times = []
    for _ in range(n):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5, help="runs of each help (default 5)")
    parser.add_argument(
        "--commands",
        default=None,
        help="comma-separated commands to time after the top-level help (default: every command and "
        f"subcommand: {', '.join([*COMMANDS, *NESTED])})",
    )
    args = parser.parse_args(argv)
    commands = args.commands.split(",") if args.commands else [*COMMANDS, *NESTED]
    print(f"{' '.join(selfsteer_command())}, median of {args.n} runs (slowest in brackets)")
    rows = [("--help", time_help([], args.n))]
    print(f"  {'selfsteer --help':<40} {statistics.median(rows[0][1]):6.3f} s  ({max(rows[0][1]):.3f})")
    for name in commands:
        times = time_help(name.split(), args.n)
        rows.append((name, times))
        label = f"selfsteer {name} --help"
        print(f"  {label:<40} {statistics.median(times):6.3f} s  ({max(times):.3f})", flush=True)
    slowest = max(rows, key=lambda row: statistics.median(row[1]))
    print(f"slowest median: {slowest[0]} {statistics.median(slowest[1]):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
