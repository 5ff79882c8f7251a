"""One way from a supervisor's name to a Supervisor, for every command line and suite.

    make_supervisor("rule")                         # RuleSupervisor()
    make_supervisor("llm", chat_model=m, strategy="compact_stats")
    make_supervisor("llm:compact_stats", chat_model=m)   # the same: the strategy after the colon
    make_supervisor("none")                         # None: no supervisor

Names: `none`, `rule`, `plateau`, `probe`, `probe-llm`, `llm[:STRATEGY]`, `intervener[:ADAPTER_DIR]`, `tools`, `human`,
`module:Class`, or an entry point of the group `selfsteer.supervisors` (see
`agents.supervisors.load_supervisor`, which this adds `llm:STRATEGY` to).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfsteer.agents.supervisors import Supervisor

CHAT_MODEL_KINDS = ("llm", "tools", "probe-llm")  # the supervisors that talk to a chat model


def split_name(name: str) -> tuple[str, str | None]:
    """`llm:compact_stats` -> ("llm", "compact_stats"); any other name -> (name, None)."""
    kind, colon, strategy = name.partition(":")
    return (kind, strategy) if kind == "llm" and colon else (name, None)


def needs_chat_model(name: str) -> bool:
    """Whether the supervisor `name` talks to a chat model (the caller makes one: --llm, --base-url)."""
    return split_name(name)[0] in CHAT_MODEL_KINDS


def make_supervisor(name: str, *, chat_model=None, strategy: str = "json_history") -> Supervisor | None:
    """The supervisor `name` asks for, or None for `none`. `chat_model`: what `llm` and `tools` talk to
    (None: the embedded model); `strategy`: the prompt strategy of `llm` (`llm:STRATEGY` names its own)."""
    from selfsteer.agents.supervisors import load_supervisor

    kind, named = split_name(name)
    return load_supervisor(kind, chat_model=chat_model, strategy=named or strategy)
