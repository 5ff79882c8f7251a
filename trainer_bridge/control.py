"""One way to steer a run, two roads to it: `RunControl` is what a supervisor, its tools and its graph
use; `BridgeClient` (client.py) is the road over HTTP to a run in another process, `LocalRunControl`
the road to a run in this process: direct calls on its bridge, no request, and waits that wake on the
journal's change notices instead of polling it.

    control = LocalRunControl(run.bridge, source="llm")      # or BridgeClient(url, source="llm")
    uuid = control.set_lr(2e-3)["uuid"]
    control.wait(uuid)                                        # the journal row, success or failed

Both speak the API's vocabulary: the same rows, and the same errors (`BridgeHTTPError` with 422 for a
command refused, 409 for a run that is over, 404 for an unknown command or decision), so code written
against one runs against the other.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from selfsteer.trainer_bridge.client import DONE, BridgeHTTPError, CommandTimeout, _Commands
from selfsteer.trainer_bridge.commands import InvalidCommand, NotFound, RunFinished
from selfsteer.trainer_bridge.records import Decision, DecisionUpdate, NewDecision

if TYPE_CHECKING:  # the bridge pulls in torch; this module is imported where torch is not wanted
    from selfsteer.trainer_bridge.bridge import Bridge


@runtime_checkable
class RunControl(Protocol):
    """What steering a run takes, whichever road leads to it."""

    source: str

    def state(self) -> dict: ...
    def metrics(
        self, since: int | None = None, branch: str | None = None, names: list[str] | None = None
    ): ...
    def send(self, type: str, *, idempotency_key: str | None = None, **args: Any) -> dict: ...
    def commands(self, status: str | None = None) -> list[dict]: ...
    def command(self, uuid: str) -> dict: ...
    def wait(self, uuid: str, timeout: float = 60.0, poll_s: float = 0.05) -> dict: ...
    def watch(self) -> int: ...
    def wait_for_change(self, token: int, timeout: float, poll_s: float = 0.2) -> bool: ...
    def checkpoints(self) -> list[dict]: ...
    def branches(self) -> list[dict]: ...
    def decisions(self, key: str | None = None) -> list[Decision]: ...
    def record_decision(self, decision: NewDecision) -> Decision: ...
    def update_decision(self, decision_id: int, update: DecisionUpdate) -> Decision: ...
    def reflections(self, agent: str | None = None, limit: int = 5) -> list[Decision]: ...
    def close(self) -> None: ...

    # The helpers, one per command: `send(type, **args)`.
    def set_lr(self, lr: float, idempotency_key: str | None = None, schedule: str | None = None): ...
    def set_max_grad_norm(self, value: float, idempotency_key: str | None = None): ...
    def pause(self, idempotency_key: str | None = None): ...
    def resume(self, idempotency_key: str | None = None): ...
    def stop(self, idempotency_key: str | None = None): ...
    def save_checkpoint(
        self, name: str | None = None, idempotency_key: str | None = None, memory: bool = False
    ): ...
    def load_checkpoint(
        self, checkpoint: str, branch: str | None = None, idempotency_key: str | None = None
    ): ...
    def evaluate(self, idempotency_key: str | None = None): ...
    def probe(self, factors: list[float] | None = None, steps: int | None = None, horizon: int | None = None,
              idempotency_key: str | None = None, restart: list[float] | None = None): ...  # one line per command, like the stubs above # fmt: skip


class LocalRunControl(_Commands):
    """A run in this process, steered through its bridge directly."""

    def __init__(self, bridge: Bridge, source: str = "api"):
        if not bridge.is_main:
            raise ValueError("a run is steered from rank 0")
        self.bridge = bridge
        self.source = source
        self.url = bridge.url  # where people can look at it, if it is served

    def close(self) -> None:
        pass  # the bridge belongs to the run

    def __enter__(self) -> LocalRunControl:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def state(self) -> dict:
        return self.bridge.state()

    def metrics(self, since: int | None = None, branch: str | None = None, names: list[str] | None = None):
        return self.bridge.metrics(since=since, branch=branch, names=names)

    def send(self, type: str, *, idempotency_key: str | None = None, **args: Any) -> dict:
        try:
            return self.bridge.submit(type, args, self.source, idempotency_key)
        except InvalidCommand as exc:
            raise BridgeHTTPError(422, str(exc)) from None
        except RunFinished as exc:
            raise BridgeHTTPError(409, str(exc)) from None

    def commands(self, status: str | None = None) -> list[dict]:
        return self.bridge.commands(status)

    def command(self, uuid: str) -> dict:
        try:
            return self.bridge.command(uuid)
        except NotFound as exc:
            raise BridgeHTTPError(404, str(exc)) from None

    def wait(self, uuid: str, timeout: float = 60.0, poll_s: float = 0.05) -> dict:
        """Until the command succeeded or failed; returns its journal row. Wakes when the journal
        changes (`poll_s` is ignored: nothing is polled)."""
        deadline = time.monotonic() + timeout
        while True:
            version = self.bridge.version  # before the read: a change after it wakes the wait below
            row = self.command(uuid)
            if row["status"] in DONE:
                return row
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandTimeout(f"command {uuid} still {row['status']} after {timeout} s")
            self.bridge.wait_for_change(version, left)

    def watch(self) -> int:
        """A token: read it, look at the run, then `wait_for_change(token, ...)` sleeps only if nothing
        changed since (a command's journal, a decision, an evaluation, the end of the run)."""
        return self.bridge.version

    def wait_for_change(self, token: int, timeout: float, poll_s: float = 0.2) -> bool:
        """Until a change after `token` (True) or `timeout` (False)."""
        return self.bridge.wait_for_change(token, timeout)

    def checkpoints(self) -> list[dict]:
        return self.bridge.list_checkpoints()

    def branches(self) -> list[dict]:
        return self.bridge.list_branches()

    def decisions(self, key: str | None = None) -> list[Decision]:
        return [Decision.model_validate(row) for row in self.bridge.decisions(key=key)]

    def record_decision(self, decision: NewDecision) -> Decision:
        try:
            return Decision.model_validate(self.bridge.record_decision(decision))
        except NotFound as exc:
            raise BridgeHTTPError(404, str(exc)) from None

    def update_decision(self, decision_id: int, update: DecisionUpdate) -> Decision:
        try:
            return Decision.model_validate(self.bridge.update_decision(decision_id, update))
        except NotFound as exc:
            raise BridgeHTTPError(404, str(exc)) from None

    def reflections(self, agent: str | None = None, limit: int = 5) -> list[Decision]:
        rows = self.bridge.store.list_reflections(agent=agent, limit=limit)
        return [Decision.model_validate(row) for row in rows]
