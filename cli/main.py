"""`selfsteer`: the command line. Each command lives in its own module of this package, which
provides `add_parser(subparsers)` (its arguments and help) and `run(args) -> int` (its exit code)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> module of selfsteer.cli; the order is the order of `selfsteer --help`.
COMMANDS = {
    "doctor": "doctor",
    "demo": "demo",
    "serve-llm": "serve_llm",
    "reflect": "reflect",
    "recipes": "recipes",
    "train": "train",
    "replay": "replay",
    "supervise": "supervise",
    "dashboard": "dashboard",
    "decisions": "decisions",
    "intervener": "intervener",
    "eval": "eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsteer",
        description="LLMs that supervise training runs and correct themselves.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"selfsteer.cli.{module_name}")
        module.add_parser(subparsers, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"selfsteer.cli.{COMMANDS[args.command]}")
    try:
        code = int(module.run(args) or 0)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of torchrun / accelerate launch
        from selfsteer.trainer_bridge.runner import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
