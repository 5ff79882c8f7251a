"""`selfsteer supervise --url URL`: attach a supervisor to a run that is already serving."""

from __future__ import annotations

import os

from selfsteer.cli.common import (
    add_llm_arguments,
    add_supervisor_arguments,
)


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="attach a supervisor (rules, an LLM, a person, your own) to a running training run",
        description="Watch a run served by `selfsteer train` (or any trainer made interactive) and steer its "
        "learning rate: observe -> decide -> act -> wait, until the run ends. Each decision is printed and "
        "recorded in the run's own store through its server (the URL is all it needs); the loop's state is "
        "checkpointed in --db, so running the same command again after a crash resumes without acting twice.",
    )
    parser.add_argument("--url", required=True, help="the run's control server, e.g. http://127.0.0.1:7007")
    parser.add_argument(
        "--token", default=os.environ.get("SELFSTEER_TOKEN"), help="bearer token, if the server wants one"
    )
    parser.add_argument(
        "--db",
        default="selfsteer.sqlite",
        help="where the supervisor keeps its own state, to resume after a crash (default ./selfsteer.sqlite)",
    )
    add_supervisor_arguments(parser)
    add_llm_arguments(parser)
