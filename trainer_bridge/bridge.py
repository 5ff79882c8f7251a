"""The steering core: everything that happens at an optimizer-step boundary of a live training run,
whatever loop runs it. Commands in, metrics and events out.

An adapter drives it from its loop (`selfsteer.integrations`): the Hugging Face Trainer (a callback), a
plain PyTorch loop (`selfsteer.attach`), Lightning (`SteerCallback`), an accelerate loop. At each
boundary the adapter builds a `StepContext` (the live model, optimizer, scheduler and the loop's
`args` / `state` / `control`, with the field names of the Trainer's own) and calls `boundary(ctx)`; it
reports logs with `on_log`, its own saves with `on_trainer_save`, and the end with `on_train_end`.
The `StepContext` and the loop's own `LoopArgs` / `LoopState` / `LoopControl` are in `loop.py`; the
run's settings, `BridgeConfig`, in `config.py`.

How a command travels:
1. the control server (a thread) validates it and journals it in the store as `pending`;
2. at the next boundary (the start of training counts as step 0) the training thread reads the pending
   rows, marks each `running` with the step, applies it, and journals `success` with a result or
   `failed` with the error. A failing command never stops training;
3. under DDP only rank 0 reads the journal and serves; it broadcasts the commands of each boundary, and
   every rank applies the same ones at the same step.
While paused, the training thread stays inside the boundary, applying commands until `resume` or `stop`.

Nothing lives only in memory: runs, metrics, commands, checkpoints and branches are in the store (the
last two as the results of journaled commands), so a replay can rebuild the run from the file alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch.distributed as dist

from selfsteer.trainer_bridge import checkpoints as ckpt
from selfsteer.trainer_bridge import optim, snapshots
from selfsteer.trainer_bridge.alignment import METRIC as ALIGNMENT_METRIC
from selfsteer.trainer_bridge.alignment import UpdateAlignment, trained_parameters
from selfsteer.trainer_bridge.commands import (
    CommandError,
    CommandRegistry,
    InvalidCommand,
    NotFound,
    RunFinished,
    dump_args,
    replay_plan,
    same_command,
)
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.loop import StepContext, rank_and_world
from selfsteer.trainer_bridge.records import FINISHED_PHASES, DecisionUpdate, NewDecision, json_number
from selfsteer.trainer_bridge.store import Store, StoreError

log = logging.getLogger(__name__)
ALIGNMENT_AUTO_MAX_PARAMS = 50_000_000  # 200 MB of float32: what update_alignment=None measures at most


class Bridge:
    def __init__(
        self,
        config: BridgeConfig | None = None,
        *,
        registry: CommandRegistry | None = None,
        data_factories: dict[str, Any] | None = None,
        store: Store | None = None,
    ):
        from selfsteer.trainer_bridge.handlers import default_registry

        self.config = config or BridgeConfig()
        self.registry = (registry or default_registry()).copy()
        # name -> zero-argument callable returning a Dataset; `reload_data` may only pick from these.
        self.data_factories: dict[str, Any] = dict(data_factories or {})
        self.current_dataset: str | None = "train" if "train" in self.data_factories else None
        self.trainer: Any = None  # the Trainer (or Lightning trainer) an adapter attached, if any
        self.rank, self.world_size = rank_and_world()
        self.is_main = self.rank == 0
        if self.config.resume_run_id and self.world_size > 1:
            # The resumed branch is named from rank 0's journal; the other ranks would not know it.
            raise ValueError("resuming a run is not supported under torchrun/accelerate yet: resume it alone")

        # Training-side state, changed only by the training thread (and mirrored on every rank).
        self.phase = "created"  # created -> running -> finished | stopped | failed
        self.training_done = False
        self.paused = self.config.start_paused
        self.stop_requested = False
        self.branch = "main"
        self._step_branch = "main"
        self.branches: dict[str, dict] = {"main": {"name": "main", "parent": None}}
        self.checkpoints: dict[str, dict] = {}
        self.memory_checkpoints: OrderedDict[str, Any] = OrderedDict()  # name -> snapshots.Snapshot
        self.start: Any = None  # a snapshots.Snapshot of step 0, with config.keep_start
        self._snapshot: dict[str, Any] = {"step": 0}
        self._published_paused = False  # as told in the last state event
        self._last_metrics: dict[str, float | None] = {}
        self._last_log: tuple[float, int] | None = None
        self._decay_groups: list[int] | None = None
        self._optimizer: Any = None  # last seen, for submit-time checks
        # The lr scheduler last seen and the optimizer steps left then, for the same checks; weakly, as
        # the runner lets go of the trainer (and its scheduler) when training ends.
        self._schedule: tuple[weakref.ref, int] | None = None
        self._finish_lock = threading.Lock()
        # Held by `submit` from its last look at the run to its answer, and by every journal write: the
        # loop cannot take (journal `running`) a command whose POST has not been answered yet. Without
        # it a held loop could apply a stop and end the run before `submit` looked again, and the stop
        # was answered 409. Reentrant: `submit` may fail its own command.
        self._admission = threading.RLock()
        # Notified at every change of the journal or the decisions: in-process readers wait on it instead
        # of polling the store (`wait_for_change`).
        self._changed = threading.Condition()
        self._version = 0
        # In-process observers of the run's record (a logger integration): each is called with
        # {"event": "command", "command": row} at every journal change and {"event": "decision",
        # "decision": row} when a decision is recorded or updated, on the thread that made the change.
        self.listeners: list[Callable[[dict], None]] = []
        # The update alignment of each optimizer step, measured by hooks on the optimizer of the first
        # boundary, logged at the next boundary (off: `config.update_alignment`).
        self.alignment: UpdateAlignment | None = (
            UpdateAlignment() if self.config.update_alignment is not False else None
        )
        # Where the loop logs an optimizer step's own metrics (its loss), against the boundary after the
        # step: 0 (the Trainer, Lightning: at the step count after it), -1 (a plain loop: at the
        # iteration that took it). A per-step metric of the core's is logged there too.
        self.step_log_offset = 0
        # Per-step points of the core's own (the update alignment) not stored yet: they go with the loop's
        # next log, in the same write, or on their own once `event_interval_s` has passed.
        self._pending_points: list[tuple[int, str, dict[str, float]]] = []
        self._pending_since = 0.0

        self.store: Store | None = None
        self._owns_store = False
        self.run_id: str | None = None
        self.server = None
        self._replay: dict[int, list[dict]] | None = None
        self._resume: dict | None = None  # {checkpoint, branch} until the resumed training begins
        if self.is_main:
            if self.config.port is not None:
                from selfsteer.trainer_bridge.server import ControlServer, dashboard_dir

                # Bound before the run exists: a taken port or a missing token leaves no orphan run.
                self.server = ControlServer(
                    self,
                    self.config.host,
                    self.config.port,
                    self.config.token,
                    self.config.event_interval_s,
                    static_dir=Path(self.config.static_dir) if self.config.static_dir else dashboard_dir(),
                )
            self._owns_store = store is None
            try:
                self.store = store or Store(self.config.db)
                # Runs whose process died leave nothing pending: their commands are failed now.
                for run_id in self.store.recover_crashed_runs():
                    log.warning("run %s crashed earlier: its unapplied commands are journaled failed", run_id)
                if self.config.replay_of:
                    self._replay = replay_plan(self.store, self.registry, self.config.replay_of)
                if self.config.resume_run_id:
                    self._reopen(self.config.resume_run_id, self.config.resume_checkpoint)
                else:
                    self.run_id = self.store.create_run(
                        self.config.run_name,
                        kind=self.config.run_kind,
                        config=self.config.run_config,
                        parent_run_id=self.config.parent_run_id or self.config.replay_of,
                    )
                if self.server is not None:
                    self.server.start()
                    if self.config.announce:
                        print(
                            f"selfsteer: run {self.run_id} is served at {self.url}/",
                            file=sys.stderr,
                            flush=True,
                        )
            except BaseException:
                self.close()  # releases the bound port
                raise

    def _reopen(self, run_id: str, checkpoint: dict | None) -> None:
        """Take over a run that ended: its branches and checkpoints as the journal has them, and a new
        branch for what follows the checkpoint (the old branch keeps the steps it took after it)."""
        if checkpoint is None:
            raise ValueError("resuming a run needs the Trainer checkpoint to resume from")
        self.store.reopen_run(run_id)
        self.run_id = run_id
        for branch in ckpt.list_branches(self.store, run_id):
            self.branches[branch["name"]] = {"name": branch["name"], "parent": branch["parent"]}
        for info in ckpt.list_checkpoints(self.store, run_id):
            self.checkpoints[info["name"]] = info
        resumes = sum(1 for c in self.store.list_commands(run_id) if c["source"] == "resume")
        self._resume = {"checkpoint": checkpoint, "branch": f"resume-{resumes + 1}"}

    # ---- wiring

    @property
    def url(self) -> str | None:
        return self.server.url if self.server is not None else None

    def publish(self, event: dict) -> None:
        if self.server is not None:
            self.server.hub.publish(event)

    def close(self) -> None:
        """Stops the server and releases the store (the run's rows stay)."""
        if self.alignment is not None:
            self.alignment.detach()  # a run that failed never reached on_train_end
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.store is not None and self._owns_store:
            self.store.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- the outside's side (server threads, scripts)

    def submit(
        self, type: str, args: dict | None = None, source: str = "api", idempotency_key: str | None = None
    ) -> dict:
        """Validates and journals a command; the training thread applies it at the next boundary.
        Raises InvalidCommand (422) or RunFinished (409); nothing is queued then.

        idempotency_key: a command sent again under a key this run has seen is not queued again; the
        first command is returned (also once the run is over), so a client may retry safely."""
        if not self.is_main:
            raise RuntimeError("commands go to rank 0")
        spec, parsed = self.registry.parse(type, args)
        if idempotency_key is not None:
            first = self.store.get_command_by_key(self.run_id, idempotency_key)
            if first is not None:
                return self._answer(same_command(first, idempotency_key, type, parsed), repeated=True)
        if spec.check is not None:
            spec.check(self, parsed)
        with self._admission:
            return self._admit(type, parsed, source, idempotency_key)

    def _admit(self, type: str, parsed: Any, source: str, idempotency_key: str | None) -> dict:
        if self.training_done or self.phase in FINISHED_PHASES:
            raise RunFinished(
                f"run {self.run_id} is {self.phase if self.phase in FINISHED_PHASES else 'over'}"
            )
        run = self.store.get_run(self.run_id)
        if run is None or run["status"] != "running":
            raise RunFinished(f"run {self.run_id} is {run['status'] if run else 'gone'}")
        uuid = uuid4().hex
        row = self.store.add_command(
            self.run_id, type, dump_args(parsed), source, uuid=uuid, idempotency_key=idempotency_key
        )
        if row["uuid"] != uuid:  # another request under the same key got in first: the store returned it
            return self._answer(same_command(row, idempotency_key, type, parsed), repeated=True)
        self.publish({"event": "command", "command": row})
        self.notify()
        if self.training_done:
            # The run ended while this was being added, without taking it (the admission is held), maybe
            # after finish() failed what was pending: fail it here, so that no command waits forever.
            with contextlib.suppress(StoreError):
                self._journal(row["uuid"], "failed", error="the run ended before this command was applied")
            raise RunFinished(f"run {self.run_id} is over")
        return self._answer(row, repeated=False)

    def _answer(self, row: dict, repeated: bool) -> dict:
        """What a POST of a command gets: the journaled command, and where the run is now."""
        return {
            "uuid": row["uuid"],
            "status": row["status"],
            "step": self._snapshot.get("step", 0),
            "repeated": repeated,
        }

    def state(self) -> dict:
        return {
            **self._snapshot,
            "run_id": self.run_id,
            # Held by a pause command, a running run says so in its phase too, not only in `paused`.
            "phase": "paused" if self.paused and self.phase == "running" else self.phase,
            "paused": self.paused,
            "branch": self.branch,
            "url": self.url,
            "world_size": self.world_size,
            "start_kept": self.start is not None,
            "metrics": dict(self._last_metrics),
        }

    def metrics(self, since: int | None = None, branch: str | None = None, names: list[str] | None = None):
        rows = self.store.get_metrics(self.run_id, since_step=since, branch=branch, names=names)
        for row in rows:
            row["value"] = json_number(row["value"])
        return rows

    def commands(self, status: str | None = None) -> list[dict]:
        return self.store.list_commands(self.run_id, status=status)

    def command(self, uuid: str) -> dict:
        row = self.store.get_command(uuid)
        if row is None or row["run_id"] != self.run_id:
            raise NotFound(f"no command {uuid[:200]!r} in run {self.run_id}")
        return row

    # ---- decisions: what supervisors record about the run, in its own store

    def decisions(self, key: str | None = None, after_id: int = 0, limit: int | None = None) -> list[dict]:
        if key is not None:
            found = self.store.find_decision(self.run_id, key)
            return [found] if found is not None and found["id"] > after_id else []
        return self.store.list_decisions(self.run_id, after_id=after_id, limit=limit)

    def record_decision(self, decision: NewDecision) -> dict:
        """Records a decision of this run. A repeat under a `key` the run has seen returns the first."""
        if decision.retry_of is not None:
            earlier = self.store.get_decision(decision.retry_of)
            if earlier is None or earlier["run_id"] != self.run_id:
                raise NotFound(f"retry_of: no decision {decision.retry_of} in run {self.run_id}")
        row = self.store.get_decision(self.store.add_decision(self.run_id, decision))
        self.notify()
        self.tell({"event": "decision", "decision": row})
        return row

    def update_decision(self, decision_id: int, update: DecisionUpdate) -> dict:
        """What followed a decision: the command that carried it out, its outcome; under
        self-correction, the reflection on it and whether the run was rolled back to before it."""
        store = self.store
        found = store.get_decision(decision_id)
        if found is None or found["run_id"] != self.run_id:
            raise NotFound(f"no decision {decision_id} in run {self.run_id}")
        if update.command is not None:
            command = store.get_command(update.command)
            if command is None or command["run_id"] != self.run_id:
                raise NotFound(f"command: no command {update.command} in run {self.run_id}")
            store.set_decision_command(decision_id, update.command)
        if update.reflection is not None:
            store.set_reflection(decision_id, update.reflection, update.outcome, bool(update.rolled_back))
        elif update.outcome is not None:
            store.set_decision_outcome(decision_id, update.outcome)
        row = store.get_decision(decision_id)
        self.notify()
        self.tell({"event": "decision", "decision": row})
        return row

    def list_checkpoints(self) -> list[dict]:
        return ckpt.list_checkpoints(self.store, self.run_id)

    def list_branches(self) -> list[dict]:
        return ckpt.list_branches(self.store, self.run_id)

    # ---- the training thread's side

    def on_train_begin(self, ctx: StepContext) -> None:
        if self._resume is not None:
            self._journal_resume(ctx)
        self.phase = "running"
        self._last_log = (time.perf_counter(), ctx.step)
        # Before any checkpoint: every saved scheduler state then says whether an lr is held constant.
        optim.make_holdable(ctx.lr_scheduler)
        if self._resume is None:  # None: a copy of a small model's weights
            self.start = snapshots.start(ctx, self.config.keep_start, ALIGNMENT_AUTO_MAX_PARAMS)
        self.boundary(ctx)

    def boundary(self, ctx: StepContext) -> None:
        """An optimizer-step boundary: apply what is pending; while paused, wait here for more."""
        self._optimizer = ctx.optimizer
        if ctx.lr_scheduler is not None:
            self._schedule = (weakref.ref(ctx.lr_scheduler), ctx.state.max_steps - ctx.step)
        # The step that just ended trained on the branch active before this boundary's commands.
        self._step_branch = self.branch
        self._log_alignment(ctx)
        # Where the run is, before any command: a reader that sees a pause applied here sees this step.
        self._snapshot_state(ctx)
        step, branch = ctx.step, self.branch
        if self.alignment is not None:
            self.alignment.active = False  # optimizer steps in here (a probe's arms) are not the run's
        try:
            while True:
                for command in self._next_commands(ctx.step):
                    self._apply(ctx, command)
                if not self.paused or ctx.control.should_training_stop:
                    break
                self._snapshot_state(ctx)
                if self.is_main:
                    self._flush_points()  # held: what the run measured is seen while it waits
                    time.sleep(self.config.poll_s)  # other ranks wait in the next broadcast
        finally:
            if self.alignment is not None:
                self.alignment.active = True
                if ctx.step != step or self.branch != branch:
                    self.alignment.forget()  # rolled back: the last update led elsewhere
        self._snapshot_state(ctx)

    def _log_alignment(self, ctx: StepContext) -> None:
        """Logs the update alignment of the step that just ended (measured on every rank, logged on rank
        0 as every metric), and hooks onto the loop's optimizer at the first boundary."""
        if self.alignment is None or ctx.optimizer is None:
            return
        if self.config.update_alignment is None and self.alignment.optimizer is None:
            trained = trained_parameters(ctx.optimizer)
            if trained > ALIGNMENT_AUTO_MAX_PARAMS:
                log.info("update_alignment off: %d trained parameters (set it True to measure)", trained)
                self.alignment = None
                return
        self.alignment.attach(ctx.optimizer)  # the same optimizer: nothing to do
        if not self.is_main:
            self.alignment.drop()  # measured all the same; no host sync for a value nobody logs
            return
        value = self.alignment.take()
        if value is None:
            return
        now = time.perf_counter()
        if not self._pending_points:
            self._pending_since = now
        step = max(ctx.step + self.step_log_offset, 0)
        self._pending_points.append((step, self._step_branch, {ALIGNMENT_METRIC: value}))
        if now - self._pending_since >= self.config.event_interval_s:
            self._flush_points()

    def _journal_resume(self, ctx: StepContext) -> None:
        """The Trainer has loaded the checkpoint (weights, optimizer, scheduler, RNG, data position):
        say so in the journal, as a fork into a new branch at the checkpoint's step."""
        checkpoint, branch = self._resume["checkpoint"], self._resume["branch"]
        self._resume = None
        if checkpoint.get("max_grad_norm") is not None:  # the Trainer restores everything but its args
            ctx.args.max_grad_norm = checkpoint["max_grad_norm"]
        parent = checkpoint.get("branch", "main")
        self.branches[branch] = {"name": branch, "parent": parent}
        self.branch = self._step_branch = branch
        if self.is_main:
            info = {
                "branch": branch,
                "parent": parent,
                "checkpoint": checkpoint["name"],
                "checkpoint_step": checkpoint["step"],
                "fork_step": ctx.step,
                "path": checkpoint["path"],
                "restored": {"optimizer": True, "scheduler": True, "rng": True},
                "resumed": True,
            }
            args = {"checkpoint": checkpoint["name"], "branch": branch}
            row = self.store.add_command(self.run_id, "load_checkpoint", args, "resume")
            self._journal(row["uuid"], "running", step=ctx.step)
            self._journal(row["uuid"], "success", result=info)

    def on_log(self, state: Any, args: Any, logs: dict, branch: str | None = None) -> None:
        """Stores and publishes a log of the loop. `branch`: the branch the values belong to (default: a
        training loss belongs to the step just taken, anything else to the weights as they are now)."""
        if not self.is_main or not logs:
            return
        values = {
            k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if "loss" in values and self._last_log is not None:
            # Throughput over the steps since the previous training log.
            now, step = time.perf_counter(), state.global_step
            last_time, last_step = self._last_log
            if step > last_step and now > last_time and args.per_device_train_batch_size:
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world_size
                values["samples_per_s"] = (step - last_step) * batch / (now - last_time)
            self._last_log = (now, step)
        if not values:
            return
        # A training log describes the step just taken (on the branch it ran on); anything else (an
        # evaluation) describes the weights as they are now.
        branch = branch or (self._step_branch if "loss" in values else self.branch)
        # The core's own per-step points waiting since the last log go into the store with this one.
        pending, self._pending_points = self._pending_points, []
        self._store_points([*pending, (state.global_step, branch, values)])
        if any(name.startswith("eval_") for name in values):
            self.notify()  # an evaluation: what a waiting supervisor waits for
        if broken := {k: v for k, v in values.items() if not math.isfinite(v)}:
            # Stored as it is (NaN as NULL, an infinity as itself), sent as null; and said out loud, now.
            text = ", ".join(f"{k} {v}" for k, v in broken.items()) + f" at step {state.global_step}"
            log.warning("not finite on branch %s: %s", branch, text)
            self.publish(
                {
                    "event": "warning",
                    "kind": "not_finite",
                    "step": state.global_step,
                    "branch": branch,
                    "metrics": {k: None for k in broken},  # JSON's non-finite number; the text says which
                    "text": f"not finite: {text} on branch {branch}",
                }
            )

    def _store_points(self, points: list[tuple[int, str, dict[str, float]]]) -> None:
        """Stores points (step, branch, {name: value}) in one write and sends them to subscribers."""
        rows = [
            {"step": s, "name": k, "value": v, "branch": b}
            for s, b, values in points
            for k, v in values.items()
        ]
        try:
            self.store.add_metrics(self.run_id, rows)
        except StoreError:
            log.exception("could not store metrics at step %s", points[-1][0])
        for step, branch, values in points:
            finite = {k: json_number(v) for k, v in values.items()}
            self._last_metrics.update(finite)
            if self.server is not None:
                self.server.hub.publish_point({"step": step, "branch": branch, "values": finite})

    def _flush_points(self) -> None:
        """Stores the core's own points now (the loop has not logged for a while, holds, or ends)."""
        pending, self._pending_points = self._pending_points, []
        if pending and self.is_main:
            self._store_points(pending)

    def on_trainer_save(self, ctx: StepContext) -> None:
        # The Trainer's own checkpoints (save_steps) go into the journal too, so they can be loaded.
        name = f"checkpoint-{ctx.step}"
        info = {
            "name": name,
            "path": str(Path(ctx.args.output_dir) / name),
            "step": ctx.step,
            "branch": self.branch,
            "max_grad_norm": ctx.args.max_grad_norm,  # what a resume must restore (not in the checkpoint)
        }
        self.checkpoints[name] = info
        if self.is_main:
            row = self.store.add_command(self.run_id, "save_checkpoint", {"name": name}, "trainer")
            self._journal(row["uuid"], "running", step=ctx.step)
            self._journal(row["uuid"], "success", result=info)

    def on_train_end(self, ctx: StepContext) -> None:
        self.training_done = True
        if self.alignment is not None:
            self.alignment.detach()
        self._flush_points()
        self._snapshot_state(ctx)
        if self.config.auto_finish:
            self.finish()

    def finish(self, status: str | None = None, summary: Any = None, error: str | None = None) -> None:
        """Marks the run over in the store (once); commands still pending are failed, not lost."""
        with self._finish_lock:
            if self.phase in FINISHED_PHASES:
                return
            status = status or ("stopped" if self.stop_requested else "finished")
            self.training_done = True
            self.phase = status
        if not self.is_main:
            return
        self._flush_points()
        reason = error or f"the run ended ({status}) before this command was applied"
        for command in self.store.list_commands(self.run_id, status="pending"):
            with contextlib.suppress(StoreError):  # applied meanwhile: nothing to fail
                self._journal(command["uuid"], "failed", error=reason)
        try:
            self.store.finish_run(self.run_id, status, summary)
        except StoreError:  # finished elsewhere (another process closed it): keep that record
            log.exception("could not finish run %s", self.run_id)
        self.publish({"event": "state", "state": self.state()})
        self.notify()

    # ---- commands at a boundary

    def _next_commands(self, step: int) -> Iterator[dict]:
        """This boundary's commands, one at a time and the same on every rank. Rank 0 decides: just
        before each pending command is applied it journals it `running` at this step, or, when it cannot
        (moved on elsewhere: failed or taken by another process), drops it; it broadcasts only what it
        journaled, then an end mark. The other ranks apply exactly what they receive, so no rank applies
        a command that another skips."""
        distributed = self.world_size > 1 and dist.is_initialized()
        if not self.is_main:
            while distributed:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0)
                if box[0] is None:
                    return
                yield box[0]
            return
        if self._replay is not None:
            for original in self._replay.pop(step, []):
                self.store.add_command(self.run_id, original["type"], original["args"], "replay")
        for command in self.store.list_commands(self.run_id, status="pending"):
            try:
                self._journal(command["uuid"], "running", step=step)
            except (StoreError, KeyError):
                log.exception("command %s moved on elsewhere; no rank applies it", command["uuid"])
                continue
            if distributed:
                dist.broadcast_object_list([command], src=0)
            yield command
        if distributed:
            dist.broadcast_object_list([None], src=0)  # the end of this boundary's commands

    def _apply(self, ctx: StepContext, command: dict) -> None:
        """Applies a command `_next_commands` gave (rank 0 has journaled it running); rank 0 journals
        the outcome."""
        uuid = command["uuid"]
        try:
            spec, args = self.registry.parse(command["type"], command["args"])
            result = spec.handler(ctx, args)
        except (CommandError, InvalidCommand) as exc:
            error = str(exc)
        except Exception as exc:  # a handler bug must not end the run either
            log.exception("command %s (%s) failed", uuid, command["type"])
            error = f"{type(exc).__name__}: {exc}"
        else:
            if self.is_main:
                try:
                    self._journal(uuid, "success", result=result)  # NaN in it is stored as null
                except StoreError as exc:
                    # Not JSON at all (a custom handler's object): it was applied all the same, and the
                    # journal must say so, or a replay would not apply it.
                    log.error("command %s (%s): result not stored: %s", uuid, command["type"], exc)
                    with contextlib.suppress(StoreError):  # moved on elsewhere: that row stands
                        self._journal(uuid, "success", error=f"applied; its result was not stored: {exc}")
            return
        log.warning("command %s (%s) failed at step %s: %s", uuid, command["type"], ctx.step, error)
        if self.is_main:
            self._journal(uuid, "failed", error=error)

    def _journal(self, uuid: str, status: str, **changes: Any) -> dict:
        with self._admission:
            row = self.store.update_command(uuid, status, **changes)
        self.publish({"event": "command", "command": row})
        self.notify()
        self.tell({"event": "command", "command": row})
        return row

    def tell(self, event: dict) -> None:
        """Hands an event to each listener; a listener that fails is logged and never stops the run."""
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("listener %r failed on a %s event", listener, event.get("event"))

    # ---- change notices, for readers in this process

    def notify(self) -> None:
        """Wakes whoever waits in `wait_for_change`: the journal or the decisions changed (or something
        else the waiter checks, such as a supervisor that ended)."""
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    @property
    def version(self) -> int:
        """Counts the changes: read it, check what you wait for, then `wait_for_change(version)`."""
        return self._version

    def wait_for_change(self, version: int, timeout: float | None = None) -> bool:
        """Blocks until a change after `version` (True) or `timeout` (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._version != version, timeout)

    def agree(self, error: str | None) -> None:
        """Rank 0's verdict on a step that only it performed (writing a checkpoint), for every rank:
        all raise or none does, so no rank is left waiting in a collective."""
        if self.world_size > 1 and dist.is_initialized():
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise CommandError(error)

    # ---- state

    def decay_groups(self, ctx: StepContext) -> list[int]:
        if self._decay_groups is None and ctx.optimizer is not None:
            names = None
            if self.trainer is not None and hasattr(self.trainer, "get_decay_parameter_names"):
                names = set(self.trainer.get_decay_parameter_names(ctx.model))
            self._decay_groups = optim.decay_groups(ctx.optimizer, names, ctx.model)
        return self._decay_groups or []

    def checkpoint_dir(self, ctx: StepContext) -> Path:
        return Path(self.config.checkpoint_dir or Path(ctx.args.output_dir) / "bridge-checkpoints")

    def _snapshot_state(self, ctx: StepContext) -> None:
        snapshot = {
            "step": ctx.step,
            "max_steps": ctx.state.max_steps,
            "epoch": ctx.state.epoch,
            "max_grad_norm": ctx.args.max_grad_norm,
            "branch": self.branch,  # a fork (load_checkpoint) is a state change the dashboard must hear of
            "optimizer": None,
        }
        if ctx.optimizer is not None:
            snapshot["optimizer"] = {
                "name": optim.optimizer_name(ctx.optimizer),
                **optim.hparams(ctx.optimizer, self.decay_groups(ctx)),
            }
        previous, self._snapshot = self._snapshot, snapshot  # one reference swap: readers see old or new
        if self.server is None or not self.server.hub.subscribers:
            return
        # A state event when something but the step moved: metrics points carry the step already.
        moved = {k: v for k, v in snapshot.items() if k not in ("step", "epoch")}
        before = {k: v for k, v in previous.items() if k not in ("step", "epoch")}
        if moved != before or self.paused != self._published_paused:
            self._published_paused = self.paused
            self.publish({"event": "state", "state": self.state()})
