"""What every task is: problems that carry their own validator.

A task is a function `load(split, n, seed) -> list[Problem]`. A problem is a prompt and a
`validate(answer) -> Verdict` (pass/fail and a reason a person can read). That is the whole protocol:
the self-correction loop, failure mining and GRPO rewards only ever call `problem.validate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str = ""

    @classmethod
    def ok(cls) -> Verdict:
        return cls(True, "correct")

    @classmethod
    def fail(cls, reason: str) -> Verdict:
        return cls(False, reason)


@dataclass(frozen=True)
class Problem:
    """One task item. `prompt` is the user message; `system` the instructions that go before it."""

    id: str
    prompt: str
    validate: Callable[[str], Verdict] = field(repr=False, compare=False)
    system: str = ""
    task: str = ""


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
