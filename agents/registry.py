"""The one way from a supervisor's name to a Supervisor, for every command line, suite, collector and
LangGraph Studio:

    make_supervisor("rule")                                # RuleSupervisor()
    make_supervisor("llm", chat_model=m, strategy="compact_stats")
    make_supervisor("llm:compact_stats", chat_model=m)     # the same: the option after the colon
    make_supervisor("intervener:runs/adapter")             # another adapter
    make_supervisor("my_package.supervisors:MySupervisor") # a plug-in, built as the built-ins are
    make_supervisor("none")                                # None: no supervisor

Names: the keys of `BUILT_IN` (each optionally `NAME:OPTION`), `module:Class`, or an entry point of the
group `selfsteer.supervisors`. Every class, built-in or plug-in, is built by its
`Supervisor.from_options(chat_model=, strategy=, option=)`: the chat model the caller made (None: the
embedded one, made only if the class talks to one), the prompt strategy, and the name's option.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfsteer.agents.supervisors import Supervisor

ENTRY_POINT_GROUP = "selfsteer.supervisors"

# name -> "module:Class", imported only when asked for (the intervener's imports torch and peft)
BUILT_IN = {
    "rule": "selfsteer.agents.supervisors:RuleSupervisor",
    "plateau": "selfsteer.agents.supervisors:PlateauSupervisor",
    "llm": "selfsteer.agents.supervisors:LLMSupervisor",
    "human": "selfsteer.agents.supervisors:HumanSupervisor",
    "probe": "selfsteer.agents.probe_supervisor:ProbeSupervisor",
    "probe-llm": "selfsteer.agents.probe_supervisor:VettedProbeSupervisor",
    "hypergradient": "selfsteer.agents.hypergradient_supervisor:HypergradientSupervisor",
    "intervener": "selfsteer.agents.intervener:IntervenerSupervisor",
    "tools": "selfsteer.agents.tool_supervisor:ToolSupervisor",
}


def split_name(name: str) -> tuple[str, str | None]:
    """`llm:compact_stats` -> ("llm", "compact_stats"), `intervener:DIR` -> ("intervener", "DIR"); a
    plug-in's `module:Class` and any other name -> (name, None)."""
    kind, colon, option = name.partition(":")
    return (kind, option or None) if colon and kind in BUILT_IN else (name, None)


def _imported(target: str) -> type:
    module_name, _, class_name = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load supervisor {target!r}: {error}") from error


def supervisor_class(name: str) -> type:
    """The class the name stands for; ValueError for a name that stands for none."""
    kind, _ = split_name(name)
    if kind in BUILT_IN:
        return _imported(BUILT_IN[kind])
    if ":" in kind:
        return _imported(kind)
    points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if kind not in points:
        known = ", ".join(["none", *BUILT_IN, *points])
        raise ValueError(f"unknown supervisor {name!r}: use one of {known}, or module:Class")
    return points[kind].load()


def needs_chat_model(name: str) -> bool:
    """Whether the supervisor `name` talks to a chat model (the caller makes one: --llm, --base-url)."""
    return name != "none" and bool(getattr(supervisor_class(name), "uses_chat_model", False))


def make_supervisor(name: str, *, chat_model=None, strategy: str = "json_history") -> Supervisor | None:
    """The supervisor `name` asks for, or None for `none`. `chat_model`: what a supervisor that talks to
    one talks to (None: the embedded model); `strategy`: the prompt strategy of `llm` (`llm:STRATEGY`
    names its own)."""
    if name == "none":
        return None
    cls = supervisor_class(name)
    option = split_name(name)[1]
    build = getattr(cls, "from_options", None)
    supervisor = build(chat_model=chat_model, strategy=strategy, option=option) if build else cls()
    if not callable(getattr(supervisor, "decide", None)):
        raise ValueError(f"{name} has no decide(observation) method")
    return supervisor
