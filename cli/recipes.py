"""`selfsteer recipes`: the built-in training recipes, one name a line, smallest first."""

from __future__ import annotations

import argparse


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="list the built-in training recipes, smallest first",
        description="The built-in training recipes (for `selfsteer train --recipe NAME`), one a line, "
        "smallest first (by estimated training compute).",
    )
    parser.add_argument("--paths", action="store_true", help="also show each recipe's YAML file")
    return parser
