"""`selfsteer serve-llm`: the embedded model behind an OpenAI-compatible API
(see selfsteer.agents.llm.openai_server)."""

from __future__ import annotations

import argparse
import os

from selfsteer.agents.llm.serve_limits import DEFAULT_JSON_MAX_TOKENS, DEFAULT_MAX_TOKENS_CAP

API_KEY_ENV = "SELFSTEER_SERVE_API_KEY"

DESCRIPTION = """\
Serve the embedded model (SmolLM2-135M-Instruct, CPU) with OpenAI's chat API:
GET /v1/models and POST /v1/chat/completions (streaming, response_format json_object and
json_schema, which the server's grammar makes valid by construction). Any model name is accepted.
The OpenAPI document is at /openapi.json.

Answers in progress are decoded together, so a short one never waits for a long one; an answer
whose client disconnects stops at once; SIGTERM or Ctrl-C ends the answers in progress (their
clients get 503) and exits within seconds.
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
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS_CAP,
        metavar="N",
        help=f"the most tokens one answer may ask for (default: {DEFAULT_MAX_TOKENS_CAP}, about a minute of "
        "generation on two CPU cores). A request with a larger max_tokens (or max_completion_tokens) is "
        "refused with 400 invalid_value naming the cap, as OpenAI refuses a max_tokens above a model's "
        "limit, rather than silently clipped; a request without max_tokens gets N "
        f"(JSON answers: min(N, {DEFAULT_JSON_MAX_TOKENS}))",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="serve the embedded model with a LoRA adapter merged in: `intervener` (the shipped one) or a "
        "folder from `selfsteer intervener train`",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require `Authorization: Bearer KEY` on every request (default: ${API_KEY_ENV}); "
        "required when --host is not a loopback address",
    )
    return parser
