"""Waiting in tests for what another thread or process does: poll a condition, with a deadline that
only turns a hang into a failure (never a speed requirement)."""

from __future__ import annotations

import time


def wait_for(condition, what: str = "the condition", timeout: float = 60.0):
    """Polls `condition` every 50 ms until it is truthy; returns its value. TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never held")
        time.sleep(0.05)
    return value
