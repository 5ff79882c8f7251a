"""The supervisor's decisions and the run's branches in the user's own logger: TensorBoard or W&B.

Each logger is a bridge listener (`bridge.listeners`): the core calls it on every change of a
command's journal row and of a decision. One line hooks it in, whatever the loop:

    from selfsteer.integrations.loggers import attach_loggers
    attach_loggers(steer, tensorboard="runs/tb")           # plain loop: steer = selfsteer.attach(...)
    attach_loggers(trainer, wandb=wandb.run)               # HF Trainer from make_interactive(...)
    attach_loggers(SteerCallback_instance, tensorboard=tb_logger.experiment)   # Lightning

(`attach_loggers(x, ...)` takes a Bridge or anything with a `.bridge`; it is the same as
`bridge.listeners.append(TensorBoardDecisions(...))`.)

TensorBoard (`TensorBoardDecisions`): for each decision a text entry `selfsteer/decision` at the step it
was made on (action, lr before -> after, agent, explanation) and scalar markers
`selfsteer/decision_lr_after` and `selfsteer/decision_action` (+1 double, -1 halve, 0 keep) at the step
its command took effect (the step it was made on when it sent none, or the command failed); a
reflection (self-correction) as text `selfsteer/reflection`; each rollback or fork (a successful
`load_checkpoint`) as text `selfsteer/branch` and a scalar `selfsteer/branch_checkpoint_step` at the
step it applied. (torch's SummaryWriter files a text under "<tag>/text_summary".)

W&B (`WandbDecisions`): the decisions as a `wandb.Table` `selfsteer/decisions` (step, applied_step,
action, lr_before, lr_after, agent, explanation), logged again as rows arrive or change, beside the
user's own metrics (`commit=False`: it joins the user's next row, never moves the step); the branches
as a table `selfsteer/branches` and in the run summary (`selfsteer/branch`: the branch now,
`selfsteer/branch_points`: each branch's checkpoint and steps).
With `fork=True` a rollback also starts a W&B fork (`wandb.init(fork_from="<run id>?_step=<s>")`,
s = the step before the branch's first step): the old run is finished and the fork becomes
`wandb.run` and this logger's `.run`, so the loop must log through `wandb.log` or `.run` (HF's
WandbCallback does; a loop holding the old run object gets W&B's "run is finished" error). The fork
point lines up with the loop's steps when the loop logs with `step=` the bridge's step (the plain
loop's `it`). The old run is finished in the step boundary that applied the rollback (online, that
waits for its upload). W&B's forking copies the parent's history on its server (a preview feature); in
offline mode the fork is only written down, in the forked run's record (its branch point: parent id,
`_step`), for `wandb sync` to send after the parent's.

A listener never raises into the run: what fails is logged and dropped.
"""

from __future__ import annotations

import logging
import os
import secrets
import string
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DECISION_COLUMNS = ["step", "applied_step", "action", "lr_before", "lr_after", "agent", "explanation"]
BRANCH_COLUMNS = ["step", "branch", "parent", "checkpoint", "checkpoint_step", "continues_at", "wandb_fork"]
ACTION_SIGN = {"double": 1.0, "halve": -1.0, "keep": 0.0}


def _lr(value: Any) -> str:
    return "?" if value is None else f"{value:.6g}"


def decision_text(row: dict) -> str:
    """One decision as a line of text (markdown in TensorBoard)."""
    text = (
        f"**{row['action']}** lr {_lr(row.get('lr_before'))} -> {_lr(row.get('lr_after'))} by {row['agent']}"
    )
    if row.get("applied_step") is not None:
        text += f" (took effect at step {row['applied_step']})"
    if row.get("fallback"):
        text += " [fallback: no valid answer]"
    if row.get("explanation"):
        text += f": {row['explanation']}"
    return text


def branch_text(result: dict, step: int | None) -> str:
    """A successful load_checkpoint (a rollback or a fork) as a line of text."""
    text = (
        f"branch **{result.get('branch')}** from {result.get('parent')} at step {step}: "
        f"checkpoint {result.get('checkpoint')} (step {result.get('checkpoint_step')})"
    )
    if result.get("continues_at") is not None:
        text += f", the loop goes on from step {result['continues_at']}"
    return text


def first_branch_step(command: dict) -> int | None:
    """The first step the new branch takes: the checkpoint's step when the loop went back to it (a
    plain loop), else the step it forked at (the HF Trainer keeps counting)."""
    result = command.get("result") or {}
    first = result.get("continues_at")
    return first if first is not None else command.get("step")


def _is_branch(command: dict) -> bool:
    return (
        command.get("type") == "load_checkpoint"
        and command.get("status") == "success"
        and isinstance(command.get("result"), dict)
        and "branch" in command["result"]
    )


class _Listener:
    """What both loggers share: one event at a time (the training thread and a supervisor's may both
    call), exceptions logged and dropped, nothing after close()."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.closed = False

    def __call__(self, event: dict) -> None:
        try:
            with self._lock:
                if self.closed:
                    return
                if event.get("event") == "decision":
                    self.on_decision(event["decision"])
                elif event.get("event") == "command":
                    self.on_command(event["command"])
        except Exception:
            log.exception("%s: dropped a %s event", type(self).__name__, event.get("event"))

    def on_decision(self, row: dict) -> None:
        raise NotImplementedError

    def on_command(self, row: dict) -> None:
        raise NotImplementedError


class TensorBoardDecisions(_Listener):
    """Writes the decisions and the branches to TensorBoard. `writer_or_log_dir`: a SummaryWriter
    (torch's or tensorboardX's: anything with add_text/add_scalar, such as the HF TensorBoardCallback's
    `tb_writer` or Lightning's `TensorBoardLogger.experiment`), or a folder for a writer of its own."""

    def __init__(self, writer_or_log_dir: Any):
        super().__init__()
        if isinstance(writer_or_log_dir, str | os.PathLike):
            self.writer = _summary_writer(os.fspath(writer_or_log_dir))
            self._owns_writer = True
        else:
            self.writer = writer_or_log_dir
            self._owns_writer = False
        self._texted: set[int] = set()  # decisions whose text is written
        self._reflected: set[int] = set()
        self._pending: dict[int, dict] = {}  # decisions whose marker waits for their command
        self._by_command: dict[str, int] = {}  # command uuid -> decision id
        self._marked: set[int] = set()
        self._branches: set[str] = set()  # load_checkpoint uuids written

    def on_decision(self, row: dict) -> None:
        decision_id = row["id"]
        if decision_id not in self._texted:
            self._texted.add(decision_id)
            self.writer.add_text("selfsteer/decision", decision_text(row), global_step=row["step"])
        if row.get("reflection") and decision_id not in self._reflected:
            self._reflected.add(decision_id)
            verdict = "rolled back" if row.get("rolled_back") else "kept"
            what = f"{row['action']} at step {row['step']}, {verdict}"
            text = f"decision {decision_id} ({what}): {row['reflection']}"
            self.writer.add_text("selfsteer/reflection", text, global_step=row["step"])
        if decision_id not in self._marked:
            if row.get("applied_step") is not None:
                self._mark(row, row["applied_step"])
            elif row.get("command") is None and row["action"] == "keep":
                self._mark(row, row["step"])  # nothing to send: it holds where it was made
            else:
                self._pending[decision_id] = row
                if row.get("command"):
                    self._by_command[row["command"]] = decision_id
        self.writer.flush()

    def on_command(self, row: dict) -> None:
        decision_id = self._by_command.get(row["uuid"])
        if decision_id is not None and row.get("status") in ("success", "failed"):
            del self._by_command[row["uuid"]]
            decision = self._pending.get(decision_id)
            if decision is not None:
                applied = row.get("step") if row["status"] == "success" else None
                self._mark(decision, applied if applied is not None else decision["step"])
        if _is_branch(row) and row["uuid"] not in self._branches:
            self._branches.add(row["uuid"])
            result = row["result"]
            self.writer.add_text(
                "selfsteer/branch", branch_text(result, row.get("step")), global_step=row.get("step")
            )
            if result.get("checkpoint_step") is not None:
                self.writer.add_scalar(
                    "selfsteer/branch_checkpoint_step",
                    float(result["checkpoint_step"]),
                    global_step=row.get("step"),
                )
        self.writer.flush()

    def _mark(self, row: dict, step: int) -> None:
        self._marked.add(row["id"])
        self._pending.pop(row["id"], None)
        lr_after = row.get("lr_after") if row.get("lr_after") is not None else row.get("lr_before")
        if lr_after is not None:
            self.writer.add_scalar("selfsteer/decision_lr_after", float(lr_after), global_step=step)
        self.writer.add_scalar(
            "selfsteer/decision_action", ACTION_SIGN.get(row["action"], 0.0), global_step=step
        )

    def close(self) -> None:
        """Marks the decisions still waiting for their command at the step they were made on, then
        flushes (and closes a writer of its own)."""
        with self._lock:
            if self.closed:
                return
            for row in list(self._pending.values()):
                self._mark(row, row["step"])
            self.writer.flush()
            if self._owns_writer:
                self.writer.close()
            self.closed = True


def _summary_writer(log_dir: str) -> Any:
    """torch's SummaryWriter where the tensorboard package is installed, else tensorboardX's."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardDecisions(log_dir) needs `pip install tensorboard` (or tensorboardX)"
            ) from None
    return SummaryWriter(log_dir=log_dir)


class WandbDecisions(_Listener):
    """Logs the decisions and the branches to a W&B run (default: `wandb.run`). fork=True: a rollback
    also starts a W&B fork of the run (see the module's docstring); `.run` is the run logged to now."""

    def __init__(self, run: Any = None, *, fork: bool = False):
        super().__init__()
        import wandb

        self._wandb = wandb
        self.run = run if run is not None else wandb.run
        if self.run is None:
            raise ValueError("WandbDecisions needs a run: wandb.init() first, or pass one")
        self.fork = fork
        self.decisions: dict[int, list] = {}  # id -> table row, in the order they came
        self.branches: list[list] = []
        self._seen_branches: set[str] = set()
        self._by_command: dict[str, int] = {}  # command uuid -> the decision it carries out
        self.forks: list[str] = []  # the W&B runs forked, in order

    def on_decision(self, row: dict) -> None:
        if row.get("command") and row.get("applied_step") is None:
            self._by_command[row["command"]] = row["id"]  # its step comes with the command's success
        values = [row["step"], row.get("applied_step"), row["action"], row.get("lr_before"),
                  row.get("lr_after"), row["agent"], row.get("explanation") or ""]  # the decisions table's columns, in order # fmt: skip
        known = self.decisions.get(row["id"])
        if known is not None and values[1] is None:
            values[1] = known[1]  # learnt from the command's event
        if known == values:
            return  # an update that changes nothing the table shows (an outcome, a reflection)
        self.decisions[row["id"]] = values
        self._log_decisions()

    def on_command(self, row: dict) -> None:
        decision_id = self._by_command.get(row["uuid"])
        if decision_id is not None and row.get("status") in ("success", "failed"):
            del self._by_command[row["uuid"]]
            values = self.decisions.get(decision_id)
            if values is not None and row["status"] == "success" and values[1] != row.get("step"):
                values[1] = row.get("step")
                self._log_decisions()
        if not _is_branch(row) or row["uuid"] in self._seen_branches:
            return
        self._seen_branches.add(row["uuid"])
        result = row["result"]
        forked_id = _run_id() if self.fork else ""
        self.branches.append([
            row.get("step"), result["branch"], result.get("parent"), result.get("checkpoint"),
            result.get("checkpoint_step"), result.get("continues_at"), forked_id,
        ])  # the branches table's columns, in order # fmt: skip
        self.run.summary["selfsteer/branch"] = result["branch"]
        self.run.summary["selfsteer/branch_points"] = {
            b[1]: dict(zip(BRANCH_COLUMNS, b, strict=True)) for b in self.branches
        }
        self.run.log({"selfsteer/branches": self._table(BRANCH_COLUMNS, self.branches)}, commit=False)
        if self.fork:
            first = first_branch_step(row)
            self._start_fork(forked_id, result["branch"], 0 if first is None else max(first - 1, 0))

    def _start_fork(self, run_id: str, branch: str, step: int) -> None:
        old = self.run
        kwargs: dict[str, Any] = {
            "id": run_id,
            "fork_from": f"{old.id}?_step={step}",
            "project": old.project,
            "group": old.group or None,
            "name": f"{old.name}/{branch}" if old.name else branch,
            "config": dict(old.config),
            "dir": old.settings.root_dir,
            "mode": old.settings.mode,
            "reinit": "finish_previous",
        }
        if old.entity:
            kwargs["entity"] = old.entity
        self.run = self._wandb.init(**kwargs)
        self.forks.append(self.run.id)
        self._log_decisions()

    def _table(self, columns: list[str], rows: list[list]) -> Any:
        return self._wandb.Table(columns=columns, data=[list(r) for r in rows], log_mode="MUTABLE")

    def _log_decisions(self) -> None:
        if self.decisions:
            table = self._table(DECISION_COLUMNS, list(self.decisions.values()))
            self.run.log({"selfsteer/decisions": table}, commit=False)

    def close(self) -> None:
        """Logs the tables once more (the last state of every row). The run stays the user's to finish."""
        with self._lock:
            if not self.closed:
                self._log_decisions()
                self.closed = True


def _run_id() -> str:
    """A new W&B run id (W&B's own are 8 of [a-z0-9]): named before the fork starts, so the parent's
    branch entry can name its child."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def attach_loggers(
    target: Any, *, tensorboard: Any = None, wandb: Any = None, fork: bool = False
) -> list[Callable[[dict], None]]:
    """Hooks the decision loggers into a run. target: a Bridge, or what holds one as `.bridge` (the plain
    loop's `steer`, the Trainer from `make_interactive`, Lightning's `SteerCallback`). tensorboard: a
    SummaryWriter or a log folder; wandb: a W&B run, or True for `wandb.run`; fork: see `WandbDecisions`.
    Returns the listeners (call `.close()` on each when training ends to flush them)."""
    bridge = getattr(target, "bridge", target)
    if not hasattr(bridge, "listeners"):
        raise TypeError(
            f"attach_loggers needs a Bridge or an object with .bridge, not {type(target).__name__}"
        )
    added: list[Callable[[dict], None]] = []
    if tensorboard is not None:
        added.append(TensorBoardDecisions(tensorboard))
    if wandb is not None and wandb is not False:
        added.append(WandbDecisions(None if wandb is True else wandb, fork=fork))
    bridge.listeners.extend(added)
    return added
