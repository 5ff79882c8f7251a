"""`selfsteer`: the command line. Each command has two modules of the same name: one of this package,
selfsteer.cli.NAME, provides `add_parser(subparsers, name)` (its arguments and help; it imports nothing
heavy), and one of selfsteer.cli.commands, selfsteer.cli.commands.NAME, provides `run(args) -> int` (its
exit code) with its imports at its top. Building the parser imports every selfsteer.cli.NAME; a command's
run side is imported only when that command runs, so `selfsteer --help` and `selfsteer COMMAND --help`
import no torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> its module of selfsteer.cli (the parser) and of selfsteer.cli.commands (the run); the
# order is the order of `selfsteer --help`.
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
    module = importlib.import_module(f"selfsteer.cli.commands.{COMMANDS[args.command]}")
    try:
        code = int(module.run(args) or 0)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        code = 130
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of torchrun / accelerate launch
        # here, not at the top: the runner imports torch, which `selfsteer --help` must not
        from selfsteer.trainer_bridge.runner import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
