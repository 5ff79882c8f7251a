"""The decisions and the branches in the user's logger (selfsteer.integrations.loggers): a real plain
loop with a real bridge and store, decisions recorded and carried out through the core (set_lr), a
rollback through the real load_checkpoint; then the TensorBoard event files and the W&B offline run
folder are read back. No network, no account."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import selfsteer
from selfsteer.integrations.loggers import TensorBoardDecisions, WandbDecisions, attach_loggers
from selfsteer.trainer_bridge.control import LocalRunControl
from selfsteer.trainer_bridge.records import DecisionUpdate, NewDecision
from selfsteer.trainer_bridge.store import Store
from tests.helpers.polling import wait_for

STEPS = 10


def supervised_loop(tmp_path: Path, *, loggers: dict, log_step=None) -> tuple:
    """A tiny regression in a plain loop, supervised in process. In the bodies of iterations:
    1: double (set_lr), 2: keep, 3: save checkpoint "c" (step 4), 5: halve (set_lr),
    7: roll back to "c" on branch "retry" (applied at step 8, the loop goes on from step 4),
    8 (on "retry"): the halve is reflected on and marked rolled back.
    `log_step(it, loss)` is the user's own logging. Returns (steer, the listeners, what was sent)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    steer = selfsteer.attach(
        model,
        optimizer,
        max_steps=STEPS,
        port=None,
        db=tmp_path / "runs.db",
        output_dir=tmp_path / "out",
        announce=False,
    )
    listeners = attach_loggers(steer, **loggers)
    control = LocalRunControl(steer.bridge)
    sent: dict = {}

    def decide(action: str, lr_after: float, explanation: str) -> None:
        lr = optimizer.param_groups[0]["lr"]
        decision = control.record_decision(NewDecision(
            step=steer.step, agent="rule", action=action, lr_before=lr, lr_after=lr_after,
            explanation=explanation,
        ))  # a rule decision, field by field # fmt: skip
        sent.setdefault("decisions", []).append(decision.id)
        if action != "keep":
            uuid = control.set_lr(lr_after)["uuid"]
            control.update_decision(decision.id, DecisionUpdate(command=uuid))

    actions = {
        1: lambda: decide("double", 0.02, "loss falls steadily"),
        2: lambda: decide("keep", 0.02, "no change needed"),
        3: lambda: sent.setdefault("save", control.save_checkpoint("c")["uuid"]),
        5: lambda: decide("halve", 0.01, "loss went up"),
        7: lambda: sent.setdefault("load", control.load_checkpoint("c", branch="retry")["uuid"]),
        8: lambda: control.update_decision(
            sent["decisions"][2],
            DecisionUpdate(
                reflection="halving came too late",
                rolled_back=True,
                outcome={"eval_loss_delta": 0.1},
            ),
        ),
    }
    x = torch.randn(64, 4)
    y = x.sum(dim=1, keepdim=True)
    for it in steer.steps():
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steer.log(loss=loss.item())
        if log_step is not None:
            log_step(it, loss.item())
        if it in actions:
            actions.pop(it)()
    assert not actions
    for listener in listeners:
        listener.close()
    return steer, listeners, sent


def check_the_run(steer, sent) -> dict:
    """What the core's store says happened (the loggers must say the same)."""
    store = Store(Path(steer.bridge.config.db))
    decisions = {row["id"]: row for row in store.list_decisions(steer.bridge.run_id)}
    double, keep, halve = (decisions[i] for i in sent["decisions"])
    assert (double["step"], double["applied_step"]) == (1, 2)
    assert (keep["step"], keep["applied_step"]) == (2, None)
    assert (halve["step"], halve["applied_step"]) == (5, 6) and halve["rolled_back"]
    load = store.get_command(sent["load"])
    assert load["status"] == "success" and load["step"] == 8
    assert load["result"]["checkpoint_step"] == 4 and load["result"]["continues_at"] == 4
    return {"double": double, "keep": keep, "halve": halve, "load": load}


# ---- TensorBoard


def read_events(log_dir: Path):
    pytest.importorskip("tensorboard")  # the reader (and torch's SummaryWriter): pip install tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def texts(acc, tag: str) -> list[tuple[int, str]]:
    # SummaryWriter.add_text(tag) writes the text plugin's tensor under "<tag>/text_summary".
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]  # float32 in the event file


def test_tensorboard_has_each_decision_as_text_and_markers_where_it_took_effect_and_the_rollback(tmp_path):
    log_dir = tmp_path / "tb"
    steer, (tb,), sent = supervised_loop(tmp_path, loggers={"tensorboard": log_dir})
    assert isinstance(tb, TensorBoardDecisions)
    check_the_run(steer, sent)
    acc = read_events(log_dir)

    decisions = texts(acc, "selfsteer/decision")
    assert [step for step, _ in decisions] == [1, 2, 5]  # where each was made, once each
    assert decisions[0][1] == "**double** lr 0.01 -> 0.02 by rule: loss falls steadily"
    assert decisions[1][1].startswith("**keep** lr 0.02 -> 0.02 by rule")
    assert decisions[2][1] == "**halve** lr 0.02 -> 0.01 by rule: loss went up"
    # The markers: at the step the command took effect (2, 6); a keep sends none: where it was made.
    assert sorted(scalars(acc, "selfsteer/decision_lr_after")) == [(2, 0.02), (2, 0.02), (6, 0.01)]
    assert sorted(scalars(acc, "selfsteer/decision_action")) == [(2, 0.0), (2, 1.0), (6, -1.0)]

    ((step, branch),) = texts(acc, "selfsteer/branch")
    assert step == 8
    assert branch == (
        "branch **retry** from main at step 8: checkpoint c (step 4), the loop goes on from step 4"
    )
    assert scalars(acc, "selfsteer/branch_checkpoint_step") == [(8, 4.0)]
    ((step, reflection),) = texts(acc, "selfsteer/reflection")
    assert step == 5 and "rolled back" in reflection and "halving came too late" in reflection


@pytest.mark.parametrize("package", ["torch.utils.tensorboard", "tensorboardX"])
def test_tensorboard_takes_the_users_own_writer_and_never_raises_into_the_run(tmp_path, package):
    SummaryWriter = pytest.importorskip(package).SummaryWriter  # noqa: N806

    writer = SummaryWriter(log_dir=str(tmp_path / "user"))
    steer, (tb,), sent = supervised_loop(
        tmp_path,
        loggers={"tensorboard": writer},
        log_step=lambda it, loss: writer.add_scalar("loss", loss, it),
    )
    writer.close()  # the user's: the listener flushed it, and left it open
    acc = read_events(tmp_path / "user")
    assert len(acc.Scalars("loss")) == STEPS + 4  # steps 0..7 on main, 4..9 on retry
    assert [s for s, _ in texts(acc, "selfsteer/decision")] == [1, 2, 5]

    class Broken:
        def add_text(self, *args, **kwargs):
            raise OSError("disk full")

        add_scalar = flush = add_text

    run = check_the_run(steer, sent)
    broken = TensorBoardDecisions(Broken())
    broken({"event": "decision", "decision": run["double"]})  # logged, not raised
    broken({"event": "command", "command": run["load"]})
    broken({"event": "something new"})


# ---- W&B, offline


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    runs = []

    def init(**kwargs):
        run = wandb.init(project="selfsteer-test", dir=str(tmp_path), settings=wandb.Settings(
            console="off", x_disable_stats=True, save_code=False,
        ), **kwargs)  # an offline wandb run # fmt: skip
        runs.append(run)
        return run

    yield init
    if wandb.run is not None:
        wandb.run.finish()
    for run in runs:
        if not run._is_finished:
            run.finish()


def wandb_records(run_dir: Path) -> list:
    """The records of a finished offline run's transaction log (run-<id>.wandb), once its exit record
    is written (wandb-core writes the log on its own)."""
    path = run_dir / f"run-{run_dir.name.rsplit('-', 1)[1]}.wandb"
    return wait_for(
        lambda: (records := _read_log(path)) and records[-1].WhichOneof("record_type") == "exit" and records,
        f"the exit record in {path}",
        timeout=30,
    )


def _read_log(path: Path) -> list:
    """A header, then LevelDB-style log records (crc32, length, type: full/first/middle/last) in 32 KiB
    blocks, each a Record proto."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # the rest of a block too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _items(items) -> dict:
    """History or summary items as a dict: a nested key (a table's "_type", "path" ...) nests."""
    out: dict = {}
    for item in items:
        keys = [item.key] if item.key else list(item.nested_key)
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    return [
        _items(r.history.item) for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "history"
    ]


def wandb_summary(run_dir: Path) -> dict:
    summary: dict = {}
    for r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    return summary


def last_table(run_dir: Path, key: str) -> dict:
    """The last version of a logged table, as W&B wrote it (files/media/table/...table.json)."""
    refs = [row[key] for row in wandb_history(run_dir) if key in row]
    assert refs, f"no {key} in the run's history"
    assert refs[-1]["_type"] == "table-file"
    return json.loads((run_dir / "files" / refs[-1]["path"]).read_text())


def run_dir_of(run) -> Path:
    return Path(run.dir).parent


def test_wandb_has_the_decisions_table_and_the_rollback_as_a_branch_entry(tmp_path, wandb_offline):
    run = wandb_offline()
    steer, (wb,), sent = supervised_loop(
        tmp_path, loggers={"wandb": run}, log_step=lambda it, loss: run.log({"loss": loss}, step=it)
    )
    assert isinstance(wb, WandbDecisions) and wb.run is run and wb.forks == []
    run.finish()
    check_the_run(steer, sent)

    table = last_table(run_dir_of(run), "selfsteer/decisions")
    assert table["columns"] == [
        "step",
        "applied_step",
        "action",
        "lr_before",
        "lr_after",
        "agent",
        "explanation",
    ]
    assert table["data"] == [
        [1, 2, "double", 0.01, 0.02, "rule", "loss falls steadily"],
        [2, None, "keep", 0.02, 0.02, "rule", "no change needed"],
        [5, 6, "halve", 0.02, 0.01, "rule", "loss went up"],
    ]
    branches = last_table(run_dir_of(run), "selfsteer/branches")
    assert branches["data"] == [[8, "retry", "main", "c", 4, 4, ""]]
    summary = wandb_summary(run_dir_of(run))
    assert summary["selfsteer/branch"] == "retry"
    assert summary["selfsteer/branch_points"]["retry"]["checkpoint_step"] == 4
    # The tables joined the user's rows: the loop's own steps are as it logged them; after the rollback
    # W&B drops the branch's steps 4..7 (below its step 8) and keeps 8, 9: one run cannot hold a branch.
    history = wandb_history(run_dir_of(run))
    assert [row["_step"] for row in history] == list(range(STEPS))
    assert [row["_step"] for row in history if "selfsteer/decisions" in row] == [1, 2, 5, 9]


def test_wandb_fork_starts_a_forked_run_offline_that_the_loop_goes_on_logging_to(tmp_path, wandb_offline):
    import wandb

    parent = wandb_offline()
    steer, (wb,), sent = supervised_loop(
        tmp_path,
        loggers={"wandb": parent, "fork": True},
        log_step=lambda it, loss: wandb.log({"loss": loss}, step=it),  # the global run: the fork after it
    )
    (fork_id,) = wb.forks
    child = wb.run
    assert child.id == fork_id and wandb.run is child and parent._is_finished
    child.finish()
    check_the_run(steer, sent)

    # The parent: its own steps 0..7, the branch entry naming the fork.
    assert [row["_step"] for row in wandb_history(run_dir_of(parent))] == list(range(8))
    assert last_table(run_dir_of(parent), "selfsteer/branches")["data"] == [
        [8, "retry", "main", "c", 4, 4, fork_id]
    ]
    # The fork: W&B's branch point (the parent at _step 3, the step before the branch's first), written
    # in its run record for `wandb sync`; its history goes on from step 4 as the loop logs it.
    (run_record,) = [r.run for r in wandb_records(run_dir_of(child)) if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == fork_id
    point = run_record.branch_point
    assert (point.run, point.metric, point.value) == (parent.id, "_step", 3.0)
    history = wandb_history(run_dir_of(child))
    assert [row["_step"] for row in history] == list(range(4, STEPS))
    assert last_table(run_dir_of(child), "selfsteer/decisions")["data"][2] == [
        5,
        6,
        "halve",
        0.02,
        0.01,
        "rule",
        "loss went up",
    ]
