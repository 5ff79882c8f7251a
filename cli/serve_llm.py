"""`selfsteer serve-llm`: the embedded model behind an OpenAI-compatible API
(see selfsteer.agents.openai_server)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

API_KEY_ENV = "SELFSTEER_SERVE_API_KEY"

DESCRIPTION = """\
Serve the embedded model (SmolLM2-135M-Instruct, CPU) with OpenAI's chat API:
GET /v1/models and POST /v1/chat/completions (streaming, response_format json_object and
json_schema, which the server's grammar makes valid by construction). Any model name is accepted.
"""

EPILOG = f"""\
point a client at it:
  selfsteer serve-llm --port 8008
  selfsteer train --recipe RECIPE --supervisor llm --llm openai:smollm2 --base-url http://127.0.0.1:8008/v1

  # or from Python
  from langchain_openai import ChatOpenAI
  ChatOpenAI(model="smollm2", base_url="http://127.0.0.1:8008/v1", api_key="not-needed")

  curl http://127.0.0.1:8008/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 20}}'

listening beyond this machine (--host 0.0.0.0) needs an API key (--api-key or ${API_KEY_ENV});
clients then send it as the usual bearer token (--api-key on the client side, or OPENAI_API_KEY).
"""


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help="serve the embedded model with an OpenAI-compatible API",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=8008, help="port to listen on (default: 8008)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require `Authorization: Bearer KEY` on every request (default: ${API_KEY_ENV}); "
        "required when --host is not a loopback address",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    # Anyone who can reach a non-loopback address could use the model (and the CPU) otherwise.
    if not _is_loopback(args.host) and not args.api_key:
        print(
            f"error: --host {args.host} makes the server reachable from other machines; "
            f"set a key with --api-key KEY (or ${API_KEY_ENV}), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number (0-65535)", file=sys.stderr)
        return 2

    from selfsteer.agents.local_llm import ModelNotFoundError
    from selfsteer.agents.openai_server import serve

    try:
        serve(host=args.host, port=args.port, api_key=args.api_key)
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the port is taken, or the address is not this machine's
        print(f"error: {error}", file=sys.stderr)  # "cannot serve on HOST:PORT: why"
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything
