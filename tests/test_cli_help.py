"""The command line's help loads no heavy library: building the parser imports no torch, transformers,
TRL, LangChain, LangGraph, FastAPI or Ray (those load with the commands' run side, selfsteer.cli.commands,
which no help imports). How fast the help is, is measured by evals/bench/cli.py, not here."""

import os
import subprocess
import sys

from selfsteer.cli.main import COMMANDS

HEAVY = ("torch", "transformers", "trl", "langchain_core", "langgraph", "fastapi", "ray")
# `intervener train --help` and `reflect train --help` are TRL's parsers of IntervenerConfig and of
# ReflectionGRPOConfig (TrainingArguments: they import torch, as `trl sft --help` does); tests/test_cli.py
# checks them. `intervener --help` and `reflect --help` stay light.
NESTED = ("decisions collect", "decisions export", "eval lr-suite", "reflect run", "reflect eval")
# What got imported that help must not import: a heavy library, or a command's run side.
LOADED = f"sorted(m for m in sys.modules if m in {HEAVY!r} or m.startswith('selfsteer.cli.commands'))"
PROBE = f"from selfsteer.cli.main import build_parser; build_parser(); import sys; print({LOADED})"


def python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_building_the_parser_imports_nothing_heavy():
    result = python("-c", PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_every_help_exits_0_without_importing_anything_heavy():
    # One interpreter asks for every help, as `selfsteer ... --help` would, then says what got imported.
    helps = [[], *([*name.split()] for name in [*COMMANDS, *NESTED])]
    script = (
        "import contextlib, io, sys\n"
        "from selfsteer.cli.main import main\n"
        f"for argv in {helps!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            main([*argv, '--help'])\n"
        "        except SystemExit as exit_:\n"
        "            assert exit_.code == 0, (argv, exit_.code)\n"
        "    assert out.getvalue().startswith('usage: selfsteer'), argv\n"
        f"print({LOADED})\n"
    )
    result = python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_selfsteer_help_exits_0_as_a_user_types_it():
    for argv in ([], *([*name.split()] for name in [*COMMANDS, *NESTED])):
        result = python("-m", "selfsteer.cli.main", *argv, "--help")
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stdout.startswith("usage: selfsteer"), (argv, result.stdout[:200])


def test_the_supervisor_option_names_every_built_in_supervisor():
    from selfsteer.agents.registry import BUILT_IN

    result = python("-c", "from selfsteer.cli.main import main; main(['supervise', '--help'])")
    text = " ".join(result.stdout.split())  # argparse wraps lines where it likes
    said = text[text.index("--supervisor SUPERVISOR who") : text.index("--strategy STRATEGY prompt")]
    missing = [name for name in BUILT_IN if f"{name} (" not in said]
    assert not missing, f"--supervisor's help does not name {missing}"
