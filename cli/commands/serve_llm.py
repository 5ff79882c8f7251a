"""`selfsteer serve-llm`: check the flags, then serve (selfsteer.agents.llm.openai_server)."""

from __future__ import annotations

import argparse
import sys

from selfsteer.agents.llm.openai_server import serve
from selfsteer.agents.llm.weights import ModelNotFoundError
from selfsteer.cli.serve_llm import API_KEY_ENV
from selfsteer.trainer_bridge.net import is_loopback


def run(args: argparse.Namespace) -> int:
    # Anyone who can reach a non-loopback address could use the model (and the CPU) otherwise.
    if not is_loopback(args.host) and not args.api_key:
        print(
            f"error: --host {args.host} makes the server reachable from other machines; "
            f"set a key with --api-key KEY (or ${API_KEY_ENV}), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number (0-65535)", file=sys.stderr)
        return 2
    if args.max_tokens < 1:
        print(f"error: --max-tokens {args.max_tokens} must be at least 1", file=sys.stderr)
        return 2

    try:
        adapter = args.adapter
        if adapter == "intervener":
            # only for --adapter intervener: agents.intervener imports TRL and peft (seconds)
            from selfsteer.agents.intervener import ADAPTER_DIR

            adapter = ADAPTER_DIR
        serve(
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            max_tokens_cap=args.max_tokens,
            adapter=adapter,
        )
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the port is taken, or the address is not this machine's
        print(f"error: {error}", file=sys.stderr)  # "cannot serve on HOST:PORT: why"
        return 1
    return 0
