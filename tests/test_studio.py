"""langgraph.json: each graph it names imports, builds without a checkpointer (`langgraph dev` refuses one
that brings its own) and without loading the model or reaching the control server, and has the loop's
nodes."""

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
from langgraph.graph.state import CompiledStateGraph

from selfsteer.tools.tasks import Problem

ROOT = Path(__file__).resolve().parents[1]
REFLECT_NODES = {"open_episode", "attempt", "validate", "reflect", "retry", "reward"}  # graphs/reflect.py
SUPERVISE_NODES = {"observe", "check", "decide", "act", "wait"}  # graphs/supervise.py


def load(entry: str):
    """What `langgraph dev` does with an entry `./path.py:attr`: import the file, take the attribute."""
    path, _, attr = entry.partition(":")
    spec = importlib.util.spec_from_file_location(f"studio_{attr}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)


def build(factory, config=None):
    graph = factory(config)
    return asyncio.run(graph) if asyncio.iscoroutine(graph) else graph


@pytest.fixture(autouse=True)
def nothing_loaded(monkeypatch):
    for name in ("TASK", "LLM", "URL", "TOKEN", "SUPERVISOR", "STRATEGY"):
        monkeypatch.delenv(f"SELFSTEER_{name}", raising=False)
    monkeypatch.setenv("SELFSTEER_URL", "http://127.0.0.1:9")  # nothing listens: a request would fail

    def refuse(*args, **kwargs):
        raise AssertionError("building a graph loaded the embedded model")

    monkeypatch.setattr("selfsteer.agents.llm.chat.get_local_engine", refuse)


def test_langgraph_json_exports_both_loops_as_factories_without_a_checkpointer():
    config = json.loads((ROOT / "langgraph.json").read_text())
    assert set(config["graphs"]) == {"reflect", "supervise"}
    expected = {
        "reflect": {"problem"} | {f"episode:{n}" for n in REFLECT_NODES},
        "supervise": {f"supervise:{n}" for n in SUPERVISE_NODES},
    }
    for name, entry in config["graphs"].items():
        factory = load(entry)
        assert callable(factory) and not isinstance(factory, CompiledStateGraph), name  # a factory
        graph = build(factory, {"configurable": {}})
        assert isinstance(graph, CompiledStateGraph), name
        assert graph.checkpointer is None, name
        nodes = {n for n in graph.get_graph(xray=True).nodes if not n.endswith(("__start__", "__end__"))}
        assert nodes == expected[name], (name, nodes)


def test_the_reflect_graph_draws_its_problem_from_json_input():
    from selfsteer.cli.studio import build_reflect

    graph = build_reflect({"configurable": {"task": "countdown:3"}})
    drawn = graph.nodes["problem"].bound.invoke({"index": 2, "seed": 1})["problem"]
    assert isinstance(drawn, Problem) and drawn.task.startswith("countdown")
    given = Problem(id="x", prompt="?", validate=lambda answer: None)
    assert graph.nodes["problem"].bound.invoke({"problem": given}) == {}  # a caller's own problem stays


def test_settings_come_from_the_configurable_then_the_environment_then_the_default(monkeypatch):
    from selfsteer.cli.studio import setting

    assert setting(None, "task") == "countdown" and setting({}, "supervisor") == "llm"
    assert setting(None, "url") == "http://127.0.0.1:9"
    assert setting({"configurable": {"url": "http://h:1"}}, "url") == "http://h:1"
    monkeypatch.setenv("SELFSTEER_SUPERVISOR", "rule")
    from selfsteer.cli.studio import build_supervise

    assert setting(None, "supervisor") == "rule"
    assert isinstance(build_supervise(), CompiledStateGraph)
