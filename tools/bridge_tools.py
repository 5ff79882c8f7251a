"""The bridge as tools: plain methods for graphs and code, LangChain tools for tool-calling agents.
They take either road to a run (a `RunControl`): `BridgeClient(url)` over HTTP, or
`LocalRunControl(bridge)` in the run's own process.

tools = BridgeTools(BridgeClient(url, source="llm"))
tools.read_state(); tools.read_metrics(since=100); tools.set_lr(2e-3)
agent_tools = tools.as_langchain_tools()     # read_state, read_metrics, set_learning_rate, pause, ...
                                              # (agents/tool_supervisor.py binds them to a chat model)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from langchain_core.tools import StructuredTool

from selfsteer.trainer_bridge.client import BridgeClient, BridgeHTTPError, CommandTimeout
from selfsteer.trainer_bridge.commands import LR_BOUNDS
from selfsteer.trainer_bridge.control import LocalRunControl, RunControl
from selfsteer.trainer_bridge.records import FINISHED_PHASES
from selfsteer.trainer_bridge.store.runs import lineage

# What graphs and agents see of the bridge: these, not the bridge's own modules.
__all__ = [
    "LR_BOUNDS",
    "BridgeClient",
    "BridgeHTTPError",
    "BridgeTools",
    "CommandTimeout",
    "LocalRunControl",
    "RunControl",
    "current_lr",
    "sent_unless_over",
    "trained_out",
]


PROBE_WAIT_S = 900.0


class BridgeTools:
    def __init__(self, client: RunControl, wait_s: float = 30.0):
        self.client = client
        self.wait_s = wait_s

    def read_state(self) -> dict:
        """The run's state: phase, step, max_steps, optimizer hyper-parameters, latest metrics."""
        return self.client.state()

    def still_served(self, wait_s: float = 1.0) -> bool:
        """Whether the run's server answers after a connection failed (once more, a moment later)."""
        time.sleep(wait_s)
        try:
            self.read_state()
            return True
        except httpx.TransportError:
            return False

    def read_metrics(
        self, since: int | None = None, names: list[str] | None = None, branch: str | None = None
    ) -> list[dict]:
        """Metric rows {step, name, value, branch} after step `since` (all when None), of one branch's
        own rows when `branch` is given."""
        return self.client.metrics(since=since, names=names, branch=branch)

    def read_lineage(self, branch: str) -> list[dict]:
        """The metric rows of the weights training on `branch`: its own, and its ancestors' up to where it
        forked (not those of a branch the run forked away from)."""
        return lineage(self.read_metrics(), self.client.branches(), branch)

    def set_lr(self, lr: float, idempotency_key: str | None = None, schedule: str | None = None) -> dict:
        """Set the learning rate (it persists through the scheduler): schedule "scale" (the default) scales
        the rest of the LR schedule to pass through lr, "constant" holds it at lr. With an idempotency
        key, a repeat returns the command already journaled under it instead of sending another."""
        return self.client.set_lr(lr, idempotency_key=idempotency_key, schedule=schedule)

    def set_max_grad_norm(self, value: float, idempotency_key: str | None = None) -> dict:
        """Clip gradients to this norm from the next step on (0: no clipping)."""
        return self.client.set_max_grad_norm(value, idempotency_key=idempotency_key)

    def pause(self, idempotency_key: str | None = None) -> dict:
        """Pause training at the next step boundary; returns the journal row once it is paused."""
        return self.client.wait(self.client.pause(idempotency_key)["uuid"], timeout=self.wait_s)

    def resume(self, idempotency_key: str | None = None) -> dict:
        """Resume a paused run; returns the journal row once it runs again."""
        return self.client.wait(self.client.resume(idempotency_key)["uuid"], timeout=self.wait_s)

    def save_checkpoint(self) -> dict:
        """Save a checkpoint now; returns the journal row once it is done."""
        return self.client.wait(self.client.save_checkpoint()["uuid"], timeout=self.wait_s)

    def load_checkpoint(self, checkpoint: str, branch: str | None = None) -> dict:
        """Load a checkpoint into a new branch of the run (the run forks)."""
        return self.client.wait(self.client.load_checkpoint(checkpoint, branch)["uuid"], timeout=self.wait_s)

    def evaluate(self) -> dict:
        """Evaluate now; returns the journal row with the result."""
        return self.client.wait(self.client.evaluate()["uuid"], timeout=self.wait_s)

    def probe(
        self,
        factors: list[float] | None = None,
        steps: int | None = None,
        horizon: int | None = None,
        idempotency_key: str | None = None,
        restart: list[float] | None = None,
    ) -> dict:
        """Measure before deciding: train `steps` steps at each multiple of the current lr in `factors`
        (default 0.5, 1, 2) from an exact snapshot, on the same batches, then restore it. Returns the
        probe's table: per arm its eval-slice loss after the steps (`final`) and extrapolated to `horizon`
        steps (`estimate`), and `best_factor`; or {"error": why} when it could not run. `restart`: also
        train from the run's start at these multiples of its schedule (`restarts`: each arm's loss now and
        the in-memory checkpoint it ended as)."""
        try:
            row = self.client.probe(factors, steps, horizon, idempotency_key=idempotency_key, restart=restart)
            # A probe trains: on a loaded machine it outlasts a pause's wait many times over, and a wait
            # given up on would leave it running ahead of every later command.
            row = self.client.wait(row["uuid"], timeout=max(self.wait_s, PROBE_WAIT_S))
        except (BridgeHTTPError, CommandTimeout) as error:
            return {"error": str(error)}
        return row["result"] if row["status"] == "success" else {"error": row.get("error") or row["status"]}

    def as_langchain_tools(self) -> list[StructuredTool]:
        def read_metrics_window(since_step: int = 0) -> list[dict]:
            """Metric rows (loss, eval_loss, learning_rate, grad_norm) logged after `since_step`."""
            return self.read_metrics(since=since_step)

        def set_learning_rate(lr: float) -> dict:
            """Set the optimizer's learning rate from the next step on."""
            return self.set_lr(lr)

        def set_gradient_clipping(max_grad_norm: float) -> dict:
            """Clip gradients to this norm from the next step on (0: no clipping)."""
            return self.set_max_grad_norm(max_grad_norm)

        def pause_training() -> dict:
            """Pause training at the next step boundary; returns the journal row once it is paused."""
            return self.pause()

        def resume_training() -> dict:
            """Resume a paused run; returns the journal row once it runs again."""
            return self.resume()

        def probe_learning_rates(factors: list[float] | None = None, steps: int = 4) -> dict:
            """Train `steps` steps at each multiple of the current learning rate in `factors` (default 0.5,
            1, 2) from an exact copy of the run, then put the run back: each arm's eval loss after the
            steps and extrapolated further. Measure before you change the learning rate."""
            return self.probe(factors, steps)

        functions = [
            self.read_state, read_metrics_window, set_learning_rate, set_gradient_clipping, pause_training,
            resume_training, probe_learning_rates,
            self.save_checkpoint, self.load_checkpoint, self.evaluate,
        ]  # reads, commands, then checkpoints # fmt: skip
        return [StructuredTool.from_function(f) for f in functions]


def sent_unless_over(command: Callable[[], object]) -> bool:
    """Sends a command; False when the run has ended meanwhile (409, or its server is gone), which ends
    a supervisor's loop quietly."""
    try:
        command()
        return True
    except httpx.TransportError:
        return False
    except BridgeHTTPError as error:
        if error.status_code == 409:
            return False
        raise


def trained_out(run_state: dict) -> bool:
    """The run has ended, or trained its last step: nothing is left to steer."""
    max_steps = run_state.get("max_steps")
    last_step = bool(max_steps) and int(run_state.get("step") or 0) >= max_steps
    return run_state.get("phase") in FINISHED_PHASES or last_step


def current_lr(run_state: dict, rows: list[dict]) -> float:
    """The run's lr: its optimizer's as the state says, else the last logged (0.0: not known)."""
    value = (run_state.get("optimizer") or {}).get("lr")
    if isinstance(value, int | float) and value > 0:
        return float(value)
    logged = [r["value"] for r in rows if r["name"] == "learning_rate" and r["value"] is not None]
    return float(logged[-1]) if logged else 0.0
