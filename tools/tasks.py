"""What every task is: problems that carry their own validator.

A task is a function `load(split, n, seed) -> list[Problem]`. A problem is a prompt and a
`validate(answer) -> Verdict` (pass/fail and a reason a person can read). That is the whole protocol:
the self-correction loop, failure mining and GRPO rewards only ever call `problem.validate`.

A problem may also offer tools (OpenAI tool dicts, `{"type": "function", "function": {"name",
"description", "parameters"}}`): the loop then calls the model with them bound, and the answer that
reaches `validate` is the JSON rendering of the model's tool calls, `[{"name": ..., "arguments": {...}}]`
(`selfsteer.graphs.reflect.render_tool_calls`). A loader that can offer its problems either way takes a
keyword argument `call_mode` ("tools" or "text"); `load_task` passes it only to loaders that take it.

The protocol lives here, below the graphs that run it; the tasks themselves (Countdown, BFCL) and
`load_task` live in `selfsteer.evals.tasks`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Verdict:
    """pass/fail, a reason a person (and the reflecting model) can read, and optionally how far the answer
    is from the best one (`cost`: the decisions task's regret; None where a task has no such measure)."""

    passed: bool
    reason: str = ""
    cost: float | None = None

    @classmethod
    def ok(cls) -> Verdict:
        return cls(True, "correct")

    @classmethod
    def fail(cls, reason: str) -> Verdict:
        return cls(False, reason)


Message = dict[str, str]  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class Problem:
    """One task item. `prompt` is the user message; `system` the instructions that go before it.

    `tools`: OpenAI tool dicts the model may call (empty: a plain text task, as before); `tool_choice`:
    what the model is told about calling them, as OpenAI's API takes it ("required": it must call one,
    "auto": it may answer in text, or a tool's name); None leaves it to the model's default."""

    id: str
    prompt: str
    validate: Callable[[str], Verdict] = field(repr=False, compare=False)
    system: str = ""
    task: str = ""
    tools: tuple[dict, ...] = field(default=(), repr=False, hash=False)
    tool_choice: str | None = None
    first_answer: str | None = None
    actor: Callable[[list[Message]], str] | None = field(default=None, repr=False, compare=False)
    prompts: str | None = None


CALL_MODES = ("tools", "text")


class TaskLoader(Protocol):
    def __call__(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Problem]: ...


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """The split an item belongs to, fixed by a hash of its key: train and test never overlap, whatever
    the seed or n, and an item never changes sides between runs or machines."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return split
