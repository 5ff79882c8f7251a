"""One run of a recipe, start to finish: build the workload, train it behind a bridge, evaluate, write
`summary.json`. Used by `selfsteer train` and `selfsteer replay`, and by the tests and the benchmark.

    run = RecipeRun(load_recipe("tiny"), out_dir="runs/x", port=0)
    print(run.url)
    summary = run.train()

A supervisor plugs in as a callable `supervisor(control, stop_event)`, started in a thread once the
run exists and told to stop when training ends. `control` is a `LocalRunControl`: the run's API as
direct calls on its bridge (no HTTP; waits wake on the journal's change notices), the same surface as
`BridgeClient(url)`. With `hold_for_supervisor` training waits after each evaluation until the
supervisor has decided on it, so each decision is about the state it saw (the supervisor's
`pause_while_deciding` then holds the run from its observation to its action).

`summary.json`'s `compute_steps` is every optimizer step the run paid for: the steps it trained (from a
checkpoint of another run, only those after it), every probe's arms, and the branches a loop that moves
its own step counter back abandoned (`extra_compute_steps`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from selfsteer.integrations.hf_trainer import make_interactive
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.checkpoints import list_checkpoints
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.control import LocalRunControl
from selfsteer.trainer_bridge.recipe import build_workload
from selfsteer.trainer_bridge.records import strict_json
from selfsteer.trainer_bridge.store import DEFAULT_DB_PATH, Store

Supervisor = Callable[[LocalRunControl, threading.Event], None]

InteractiveTrainer = make_interactive(Trainer)


def exit_now(code: int) -> None:
    """Ends a distributed entry point once its run is closed: output flushed, then `os._exit`, so no
    interpreter finalization runs while a communication library's threads may still be alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class HoldForDecision(TrainerCallback):
    """Holds training after each evaluation until a decision about it is recorded, a command arrives (a
    pause: the supervisor then holds the run itself, and commands apply between steps only), or the
    supervisor has ended. An evaluation that an `evaluate` command runs is not held."""

    def __init__(self, run: RecipeRun, supervisor_done: threading.Event, timeout_s: float = 300.0):
        self.run, self.supervisor_done, self.timeout_s = run, supervisor_done, timeout_s
        self.seen_id = (
            0  # decisions up to this id were read at earlier polls: each poll reads only newer ones
        )

    def on_evaluate(self, args, state, control, **kwargs):
        bridge, run_id = self.run.bridge, self.run.run_id
        if any(c["type"] == "evaluate" for c in bridge.store.list_commands(run_id, status="running")):
            # An evaluation a command asked for (a tool-using supervisor's): that supervisor waits for the
            # command to finish, so holding here for its decision would hold both until the timeout.
            return
        deadline = time.monotonic() + self.timeout_s
        while not self.supervisor_done.is_set():
            version = bridge.version  # before looking: a change after it wakes the wait below
            # A decision carries its observation (a long run's is MBs): only the ones not seen yet.
            new = bridge.store.list_decisions(run_id, after_id=self.seen_id)
            self.seen_id = new[-1]["id"] if new else self.seen_id
            if any(d["step"] >= state.global_step for d in new):
                return
            if bridge.store.list_commands(run_id, status="pending"):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            bridge.wait_for_change(version, left)  # a decision, a command, or the supervisor's end


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps with the latest loss and lr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate")}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@dataclass
class ResumePoint:
    """Where a run that ended goes on from: its recipe, its output folder and its latest Trainer
    checkpoint (a journaled save whose folder is still complete on disk)."""

    run_id: str
    recipe: dict
    out_dir: Path
    checkpoint: dict

    @classmethod
    def find(cls, store: Store, run_id: str) -> ResumePoint:
        """Raises ValueError, saying why, when the run cannot be resumed."""
        store.recover_crashed_runs()  # a run whose process died is `failed` from here on
        run = store.get_run(run_id)
        if run is None:
            raise ValueError(f"no run {run_id!r} in {store.path}")
        if run["status"] == "running":
            raise ValueError(f"run {run_id} is still running (process {run['pid']} on {run['host']})")
        if run["status"] == "finished":
            raise ValueError(f"run {run_id} finished; there is nothing to resume")
        recipe = (run["config"] or {}).get("recipe")
        if recipe is None:
            raise ValueError(f"run {run_id} is not a recipe run (its config holds no recipe)")
        saves = [c for c in list_checkpoints(store, run_id) if c["source"] == "trainer"]
        complete = [c for c in saves if (Path(c["path"]) / TRAINER_STATE_NAME).is_file()]
        if not complete:
            raise ValueError(
                f"run {run_id} left no Trainer checkpoint to resume from"
                + (f" ({len(saves)} journaled, none complete on disk)" if saves else "")
                + ": make runs resumable with --set training.save_strategy=steps --set training.save_steps=N"
            )
        checkpoint = max(complete, key=lambda c: c["step"])
        out_dir = Path(run["config"].get("out_dir") or Path(checkpoint["path"]).parent.parent)
        return cls(run_id, recipe, out_dir, checkpoint)


def extra_compute_steps(journal: list[dict]) -> int:
    """Optimizer steps a run paid for that its step counter does not show, from its command journal:
    every successful `probe`'s `cost_steps` (arms trained from a snapshot, then put back), and the steps
    of each branch left by a `load_checkpoint` that moved the loop's own counter back (`continues_at`: a
    plain loop's). Under the HF Trainer the counter keeps counting through a rollback (self-correction's
    abandoned branches, `self_correction.extra_steps`, are within `steps` already), so only probes add."""
    extra = 0
    for command in journal:
        result = command.get("result") or {}
        if command["status"] != "success":
            continue
        if command["type"] == "probe":
            extra += int(result.get("cost_steps", 0))
        elif command["type"] == "load_checkpoint" and result.get("continues_at") is not None:
            extra += max(0, result["fork_step"] - result["continues_at"])
    return extra


class RecipeRun:
    def __init__(
        self,
        recipe: dict,
        out_dir: str | Path,
        db: str | Path = DEFAULT_DB_PATH,
        host: str = "127.0.0.1",
        port: int | None = 7007,
        token: str | None = None,
        replay_of: str | None = None,
        resume: ResumePoint | None = None,
        start_from: str | Path | None = None,
        interactive: bool = True,
        progress: bool = False,
        supervisor: Supervisor | None = None,
        hold_for_supervisor: bool = False,
        callbacks: list | None = None,
        optimizer: tuple[type, dict] | None = None,
    ):
        """`optimizer`: (class, kwargs) of an optimizer the recipe's `training.optim` cannot name (the
        Trainer's `optimizer_cls_and_kwargs`: built on the Trainer's parameter groups)."""
        self.recipe = recipe
        self.start_step = 0  # set when training starts (`_start_step`)
        self.resume = resume
        # A Trainer checkpoint folder (of any run) this new run goes on from: weights, optimizer,
        # scheduler, RNG, step and data position (Population Based Training's exploit).
        self.start_from = (
            str(resume.checkpoint["path"]) if resume else (str(start_from) if start_from else None)
        )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = supervisor
        self.supervisor_done = threading.Event()
        callbacks = list(callbacks or [])
        if hold_for_supervisor and supervisor is not None and interactive:
            callbacks.append(HoldForDecision(self, self.supervisor_done))
        workload = build_workload(recipe, self.out_dir / "trainer")
        kwargs: dict[str, Any] = {
            "model": workload.model,
            "args": workload.training_args,
            "train_dataset": workload.train_dataset,
            "eval_dataset": workload.eval_dataset,
            "callbacks": callbacks,
            "optimizer_cls_and_kwargs": optimizer,
        }
        self.bridge: Bridge | None = None
        if interactive:
            config = BridgeConfig(
                host=host,
                port=port,
                token=token,
                db=db,
                run_name=recipe.get("name", "recipe"),
                run_kind="replay" if replay_of else "train",
                run_config={"recipe": recipe, "out_dir": str(self.out_dir)},
                auto_finish=False,  # this class finishes the run, with the summary
                replay_of=replay_of,
                resume_run_id=resume.run_id if resume else None,
                resume_checkpoint=resume.checkpoint if resume else None,
                announce=False,  # the caller says where the run is served (selfsteer train prints it)
            )
            self.trainer = InteractiveTrainer(**kwargs, bridge=config, data_factories=workload.data_factories)
            self.bridge = self.trainer.bridge
        else:
            self.trainer = Trainer(**kwargs)  # the plain baseline (benchmarks)
        # One quiet bar instead of the Trainer's per-log printing.
        self.trainer.remove_callback(PrinterCallback)
        self.trainer.remove_callback(ProgressCallback)
        if progress:
            self.trainer.add_callback(ProgressBar())

    @property
    def url(self) -> str | None:
        return self.bridge.url if self.bridge is not None else None

    @property
    def run_id(self) -> str | None:
        return self.bridge.run_id if self.bridge is not None else None

    def train(self) -> dict:
        stop = threading.Event()
        thread = None
        if self.supervisor is not None and self.bridge is not None:

            def supervise() -> None:
                try:
                    self.supervisor(LocalRunControl(self.bridge), stop)
                finally:
                    self.supervisor_done.set()  # nothing waits for a supervisor that is gone
                    self.bridge.notify()

            thread = threading.Thread(target=supervise, name="supervisor", daemon=True)
            thread.start()
        start = time.perf_counter()
        self.start_step = self._start_step()
        try:
            self.trainer.train(resume_from_checkpoint=self.start_from)
            final = self.trainer.evaluate()
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=30)
        summary = self._summary(final, time.perf_counter() - start)
        if self.bridge is not None and self.bridge.is_main:
            self.bridge.finish(summary=summary)
            summary["status"] = self.bridge.phase
        if self.trainer.is_world_process_zero():
            (self.out_dir / "summary.json").write_text(strict_json(summary, indent=1))
        return summary

    def close(self) -> None:
        """Stops the server and, in a distributed run, tears the process group down. Call it once the
        summary is written: it lets go of the Trainer."""
        if self.bridge is not None:
            self.bridge.close()
        if not (dist.is_available() and dist.is_initialized()):
            return
        # destroy_process_group() drops only c10d's own references to the gloo group. The DDP wrapper
        # (and its reducer) held by the Trainer and its accelerator keep the group alive, and the
        # Trainer <-> bridge reference cycle keeps them until interpreter finalization, where a gloo
        # thread that needs the GIL is ended through a noexcept destructor: std::terminate, SIGABRT
        # (PyTorch PRs #96017 and #179291; seen here in about 3 of 16 DDP test runs). So the cycle is
        # broken and the wrapped model dropped now, while the interpreter is whole.
        self._let_go_of_the_trainer()
        gc.collect()
        # The ranks meet before the group goes: destroyed on one rank while another still holds its
        # connections, the same abort was seen on the rank that left first. On gloo a rank that never
        # comes (it failed) is waited for a minute, not the group's half hour.
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError as error:  # a peer is gone: tear down regardless, but say so
            print(f"[selfsteer] rank {dist.get_rank()}: teardown barrier failed: {error}", file=sys.stderr)
        dist.destroy_process_group()
        gc.collect()

    def _let_go_of_the_trainer(self) -> None:
        trainer = self.trainer
        if self.bridge is not None:
            self.bridge.trainer = None
            self.bridge._optimizer = None
        trainer.callback_handler.callbacks.clear()  # the bridge's callback and ours point back here
        trainer.model_wrapped = trainer.model
        trainer.optimizer = trainer.lr_scheduler = None
        if getattr(trainer, "accelerator", None) is not None:
            trainer.accelerator.free_memory()  # its _models (the DDP wrapper), optimizers, schedulers
        self.trainer = None

    def _start_step(self) -> int:
        """The step training starts from: that of a checkpoint of another run (`start_from`), whose steps
        that run paid for; 0 for a new run or one resumed (`resume`: its earlier steps were its own)."""
        if self.start_from is None or self.resume is not None:
            return 0
        state = Path(self.start_from) / TRAINER_STATE_NAME
        return json.loads(state.read_text()).get("global_step", 0) if state.is_file() else 0

    def _summary(self, final: dict, wall_s: float) -> dict:
        final_eval_loss = final.get("eval_loss", math.nan)
        evals = [row["eval_loss"] for row in self.trainer.state.log_history if "eval_loss" in row]
        summary: dict[str, Any] = {
            "recipe": self.recipe.get("name"),
            "final_eval_loss": final_eval_loss,
            "best_eval_loss": min([*evals, final_eval_loss]),
            "steps": self.trainer.state.global_step,
            "wall_s": round(wall_s, 3),
            "compute_steps": self.trainer.state.global_step - self.start_step,  # and what the journal adds
            "decisions": [],
            "commands": 0,
            "run_id": None,
            "db": None,
            "out_dir": str(self.out_dir),
        }
        bridge = self.bridge
        if bridge is not None and bridge.is_main:
            store = bridge.store
            evals = [row["value"] for row in store.get_metrics(bridge.run_id, names=["eval_loss"])]
            summary["best_eval_loss"] = min([v for v in evals if not math.isnan(v)] + [final_eval_loss])
            decisions = store.list_decisions(bridge.run_id)
            summary["decisions"] = [
                {
                    k: d[k]
                    for k in (
                        "step",
                        "applied_step",
                        "action",
                        "lr_before",
                        "lr_after",
                        "explanation",
                        "rolled_back",
                    )
                }
                for d in decisions
            ]
            failed = [
                d for d in decisions if d["reflection"] is not None
            ]  # judged failures (self-correction)
            summary["self_correction"] = {
                "failed": len(failed),
                "rollbacks": sum(d["rolled_back"] for d in failed),
                "extra_steps": sum(
                    (d["outcome"] or {}).get("extra_steps", 0) for d in failed if d["rolled_back"]
                ),
            }
            journal = store.list_commands(bridge.run_id)
            summary["commands"] = sum(1 for c in journal if c["source"] != "trainer")
            summary["compute_steps"] += extra_compute_steps(journal)
            summary["run_id"] = bridge.run_id
            summary["db"] = str(store.path.resolve())
            summary["branch"] = bridge.branch
            summary["replay_of"] = bridge.config.replay_of
            summary["url"] = bridge.url
        return summary


class BackgroundRun:
    """A recipe run training on a thread of this process, its control server up on a free loopback port
    (`port` 0) and a client for it: steer it from the same notebook, script or benchmark.

        with BackgroundRun(load_recipe("tiny"), out_dir="runs/bg") as live:
            live.client.set_lr(0.01)
            summary = live.join()
    """

    def __init__(self, recipe: dict, out_dir: str | Path, callbacks: list | None = None, **run_kwargs: Any):
        run_kwargs.setdefault("port", 0)
        self.db = Path(run_kwargs.get("db") or DEFAULT_DB_PATH)
        self.run = RecipeRun(recipe, out_dir=Path(out_dir), callbacks=callbacks or [], **run_kwargs)
        self.bridge = self.run.bridge
        self.client = BridgeClient(self.run.url, token=run_kwargs.get("token")) if self.run.url else None
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, name="trainer", daemon=True)

    def _train(self) -> None:
        try:
            self.summary = self.run.train()
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> BackgroundRun:
        self.thread.start()
        return self

    def join(self, timeout: float = 120.0) -> dict:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError("training did not finish")
        if self.error is not None:
            raise self.error
        return self.summary

    def __enter__(self) -> BackgroundRun:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        if self.bridge is not None and self.bridge.paused:
            with contextlib.suppress(Exception):  # the run may be over already
                self.client.resume()
        self.thread.join(60)
        if self.client is not None:
            self.client.close()
        self.run.close()
