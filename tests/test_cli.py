"""The `selfsteer` command as a user types it (real subprocesses)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from selfsteer.trainer_bridge.store import Store

SELFSTEER = [sys.executable, "-m", "selfsteer.cli.main"]


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*SELFSTEER, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_every_command(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("doctor", "demo", "serve-llm"):
        assert command in result.stdout
    assert run("demo", "--help", cwd=tmp_path).stdout.count("--llm") >= 1


def test_doctor_reports_the_installation(tmp_path):
    result = run("doctor", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for item in ("torch", "transformers", "embedded model file", "LLM in use", "all good"):
        assert item in result.stdout


def test_doctor_says_how_to_fix_an_unreachable_endpoint(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run("doctor", "--llm", "openai:m", "--base-url", f"http://127.0.0.1:{port}/v1", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot reach" in result.stdout and "--base-url" in result.stdout


def test_demo_makes_and_stores_a_live_decision(tmp_path):
    result = run("demo", "--db", "demo.sqlite", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with Store(tmp_path / "demo.sqlite") as store:
        (decision,) = store.list_decisions()
    assert decision["action"] in ("double", "halve", "keep")
    assert decision["lr_before"] == 5e-3
    assert decision["lr_after"] == {"double": 1e-2, "halve": 2.5e-3, "keep": 5e-3}[decision["action"]]
    assert decision["raw_output"].startswith('{"action":')
    assert f"Decision ({decision['latency_s']:.2f} s" in result.stdout


def test_demo_without_a_key_fails_with_one_clear_line(tmp_path):
    env_free = {k: v for k, v in os.environ.items() if "API_KEY" not in k and "BASE_URL" not in k}
    result = subprocess.run(
        [*SELFSTEER, "demo", "--llm", "openai:gpt-4o-mini"], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env=env_free,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no API key" in result.stdout and "Traceback" not in result.stdout + result.stderr
