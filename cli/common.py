"""Arguments several commands share."""

from __future__ import annotations

import argparse
import os


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("language model")
    group.add_argument(
        "--llm",
        default=os.environ.get("SELFSTEER_LLM", "local"),
        help="'local' (the embedded SmolLM2-135M-Instruct, default) or 'openai:MODEL' for any "
        "OpenAI-compatible endpoint (default: $SELFSTEER_LLM or local)",
    )
    group.add_argument(
        "--base-url",
        default=None,
        help="endpoint of an OpenAI-compatible server, e.g. http://127.0.0.1:8008/v1 "
        "(default: $SELFSTEER_BASE_URL or $OPENAI_BASE_URL, else OpenAI's)",
    )
    group.add_argument(
        "--api-key",
        default=None,
        help="API key for --llm openai:MODEL (default: $SELFSTEER_API_KEY or $OPENAI_API_KEY)",
    )
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per LLM request (default 60)")


def chat_model_from_args(args: argparse.Namespace):
    from selfsteer.agents.chat_models import make_chat_model

    return make_chat_model(args.llm, base_url=args.base_url, api_key=args.api_key, timeout=args.timeout)
