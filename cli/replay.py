"""`selfsteer replay RUN`: re-run a recorded run, applying its journaled commands at the same steps."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Rebuild a run recorded by `selfsteer train` from its recipe (kept in the store), train it again with
the same seed, and apply every command that succeeded in the original at the step it took effect
(pause and resume excepted: they change nothing a replay could see). The replay is a new run in the
store (kind "replay", parent: the original); on CPU its final eval loss equals the original's.
Exit status 0 when it does (within --tolerance), 1 when it does not.
"""


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="re-run a recorded run with its journaled commands", description=DESCRIPTION
    )
    parser.add_argument("run", metavar="RUN", help="run id (or a unique prefix of one)")
    parser.add_argument("--db", default="selfsteer.sqlite", help="the store (default: ./selfsteer.sqlite)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/replay-RUN-TIME)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="allowed |Δ final eval loss| (1e-6)")
    return parser
