"""`selfsteer doctor`: the checks, as a table, and the exit status."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from rich.console import Console
from rich.table import Table

from selfsteer.agents.chat_models import ChatModelConfigError, describe_llm_error, make_chat_model
from selfsteer.agents.llm.weights import ModelNotFoundError, cache_dir, gguf_path, is_cached
from selfsteer.cli.doctor import INSTALL_FIX, NO_DEPS_FIX, PACKAGES
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH, Store, StoreError


def run(args: argparse.Namespace) -> int:
    console = Console()
    table = Table(title="selfsteer doctor", show_lines=False)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail / fix", overflow="fold")
    problems = 0

    def row(check: str, ok: bool | None, detail: str) -> None:
        nonlocal problems
        mark = "[green]ok[/]" if ok else ("[yellow]note[/]" if ok is None else "[red]missing[/]")
        problems += ok is False
        table.add_row(check, mark, detail)

    row("python", sys.version_info >= (3, 11), f"{platform.python_version()} ({sys.executable})")
    for package in PACKAGES:
        try:
            row(package, True, importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            row(package, False, NO_DEPS_FIX.get(package, INSTALL_FIX))

    try:
        import torch  # under the try: a torch that does not import is reported as a row

        threads = torch.get_num_threads()
        if torch.cuda.is_available():
            row("device", True, f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
        else:
            row("device", True, f"CPU only: {os.cpu_count()} cores, torch uses {threads} threads")
    except ImportError:
        row("device", False, f"torch does not import: {INSTALL_FIX}")

    _check_embedded_model(row)
    _check_llm(args, row)
    _check_store(args.db, row)

    console.print(table)
    if problems:
        console.print(f"[red]{problems} problem(s)[/]: see the fixes above.")
        return 1
    console.print("[green]all good[/]")
    return 0


def _check_embedded_model(row) -> None:
    try:
        row("embedded model file", True, str(gguf_path()))
    except ModelNotFoundError as error:
        row("embedded model file", False, str(error))
        return
    directory = cache_dir()
    if is_cached(directory):
        row("embedded model cache", True, f"{directory} (safetensors; loads in about a second)")
    else:
        row("embedded model cache", None, f"{directory}: converted from the GGUF on first use (~30 s, once)")


def _check_llm(args: argparse.Namespace, row) -> None:
    if args.llm == "local":
        row(
            "LLM in use",
            True,
            "local: SmolLM2-135M-Instruct in this process (--llm openai:MODEL for an endpoint)",
        )
        return
    try:
        model = make_chat_model(
            args.llm, base_url=args.base_url, api_key=args.api_key, timeout=5.0, max_retries=0
        )
    except ChatModelConfigError as error:
        row("LLM in use", False, str(error))
        return
    base_url = str(model.openai_api_base or "https://api.openai.com/v1")
    try:
        names = [m.id for m in model.root_client.with_options(timeout=5.0).models.list()]
        listed = "listed" if model.model_name in names else f"not listed (has: {', '.join(names[:5])})"
        row("LLM in use", True, f"{args.llm} at {base_url}: reachable, model {listed}")
    except Exception as error:  # any failure here is the thing to report, whatever its type
        row("LLM in use", False, describe_llm_error(error, args.llm, base_url))


def _check_store(path: str | None, row) -> None:
    path = path or DEFAULT_DB_PATH
    if not os.path.exists(path):
        row("store", None, f"{path}: created on the first run")
        return
    try:
        with Store(path) as store:
            row(
                "store",
                True,
                f"{path}: schema v{store.schema_version}, {len(store.list_runs(limit=10000))} runs",
            )
    except StoreError as error:
        row("store", False, f"{path}: {error}")
