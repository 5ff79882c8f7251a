"""`selfsteer recipes`: list the built-in recipes."""

from __future__ import annotations

import argparse

from selfsteer.trainer_bridge.recipe import builtin_recipes, recipes_smallest_first


def run(args: argparse.Namespace) -> int:
    paths = builtin_recipes()
    for name in recipes_smallest_first():
        print(f"{name}\t{paths[name]}" if args.paths else name)
    return 0
