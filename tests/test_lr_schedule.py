"""What an lr set on a live run leads to, at every later step, on real tiny Trainer runs.

`set_optimizer(lr=new, schedule="scale")` (the default): every later step uses new/c times what the
schedule would have given it, where c is what the schedule gives the next step, so the next step uses
exactly `new`; during a warm-up the peak moves by the same factor. `schedule="constant"`: every later step
uses `new`, whatever the scheduler says. The expected values below are the transformers schedules written
out by hand, not read back from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.live_run import LiveRun
from transformers.optimization import get_scheduler

from selfsteer.tools.bridge_tools import BridgeTools
from selfsteer.trainer_bridge import optim
from selfsteer.trainer_bridge.client import BridgeHTTPError
from selfsteer.trainer_bridge.commands import CommandError, InvalidCommand
from selfsteer.trainer_bridge.handlers import default_registry
from selfsteer.trainer_bridge.store import Store

BASE = 0.003  # the tiny recipe's learning_rate
STEPS = 20
NEW = 0.01


def multiplier(kind: str, warmup: int, t: int, total: int = STEPS) -> float:
    """transformers' lr lambdas at scheduler step t (linear, cosine, constant, with warm-up)."""
    if t < warmup:
        return t / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "linear":
        return max(0.0, (total - t) / max(1, total - warmup))
    if kind == "cosine":
        progress = (t - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(kind)


def scheduled(kind: str, warmup: int, step: int) -> float:
    """The lr optimizer step `step` (1-based) uses when nobody steers: the schedule at its start."""
    return BASE * multiplier(kind, warmup, step - 1)


def overrides(kind: str, warmup: int) -> list[str]:
    return [
        f"training.lr_scheduler_type={kind}",
        f"training.warmup_steps={warmup}",
        f"training.max_steps={STEPS}",
        "training.eval_steps=1000",
    ]


def logged_lr(live: LiveRun) -> dict[int, float]:
    with Store(live.db) as store:
        rows = store.get_metrics(live.run.run_id, names=["learning_rate"], branch="main")
    return {row["step"]: row["value"] for row in rows}


CASES = [
    ("constant", 0, 5),
    ("linear", 0, 8),
    ("cosine", 0, 8),
    ("cosine", 10, 4),  # issue 10: during the warm-up
    ("constant_with_warmup", 6, 3),
]


@pytest.mark.parametrize("mode", ["scale", "constant"])
@pytest.mark.parametrize(("kind", "warmup", "at"), CASES)
def test_lr_used_at_every_later_step(tmp_path, kind, warmup, at, mode):
    with LiveRun(tmp_path, overrides(kind, warmup), gates=[at]) as live:
        live.gate.wait(at)
        uuid = live.client.set_lr(NEW, schedule=mode)["uuid"]
        live.gate.release(at)
        live.join()
        row = live.client.command(uuid)
    used = live.recorder.lr
    assert row["status"] == "success" and row["step"] == at, row

    for step in range(1, at + 1):
        assert used[step] == pytest.approx(scheduled(kind, warmup, step), rel=1e-9), step
    if mode == "constant":
        expected = {step: NEW for step in range(at + 1, STEPS + 1)}
    else:
        factor = NEW / scheduled(kind, warmup, at + 1)
        expected = {step: factor * scheduled(kind, warmup, step) for step in range(at + 1, STEPS + 1)}
    assert used[at + 1] == NEW  # exactly the value asked for, in both modes
    for step, lr in expected.items():
        assert used[step] == pytest.approx(lr, rel=1e-9, abs=1e-15), step
    # What the Trainer logged as learning_rate agrees with what the optimizer used.
    logged = logged_lr(live)
    assert all(logged[step] == pytest.approx(used[step], rel=1e-6) for step in range(1, STEPS + 1))

    # The journal says which meaning was applied, the lr it led to and where the rest of the run peaks.
    info = row["result"]["schedule"]
    assert info["mode"] == mode and info["lr"] == pytest.approx(NEW)
    assert row["args"] == {"lr": NEW, "schedule": mode}
    peak = max(expected.values())
    assert info["peak_lr"] == pytest.approx(peak)
    assert info["peak_step"] == min(s for s, lr in expected.items() if lr == pytest.approx(peak))
    if mode == "scale":
        assert info["factor"] == pytest.approx(NEW / scheduled(kind, warmup, at + 1))


def test_scale_during_warm_up_moves_the_peak(tmp_path):
    """The issue's example, spelled out: cosine with 10 warm-up steps, 0.01 at step 4 (where the
    schedule gives 0.0012). "scale" goes on warming up to 0.025 at step 11, and says so in the journal;
    "constant" stays at 0.01."""
    peaks = {}
    for mode in ("scale", "constant"):
        with LiveRun(tmp_path / mode, overrides("cosine", 10), gates=[4]) as live:
            live.gate.wait(4)
            uuid = live.client.set_lr(NEW, schedule=mode)["uuid"]
            live.gate.release(4)
            live.join()
            info = live.client.command(uuid)["result"]["schedule"]
        peaks[mode] = (
            max(live.recorder.lr.values()),
            live.recorder.lr[11],
            info["peak_lr"],
            info["peak_step"],
        )
    assert peaks["scale"] == pytest.approx((0.025, 0.025, 0.025, 11))
    assert peaks["constant"] == pytest.approx((0.01, 0.01, 0.01, 5))


def test_a_scale_that_lifts_the_peak_above_the_lr_bound_is_refused(tmp_path):
    """0.5 at step 4 of a 10-step warm-up towards 0.003 (the schedule gives 0.0012 there) would warm up
    on to 1.25, above the lr bound (1): the server refuses it (422, nothing queued). A command it could
    not check (journaled before the optimizer existed; here straight into the store) fails when applied,
    the lr untouched. 0.5 a step later (a peak of the bound itself) is taken."""
    with LiveRun(tmp_path, overrides("cosine", 10), gates=[4, 5]) as live:
        live.gate.wait(4)
        with pytest.raises(BridgeHTTPError) as refused:
            live.client.set_lr(0.5)
        assert refused.value.status_code == 422 and "above the lr bound" in str(refused.value)
        assert live.client.commands() == []  # nothing was queued
        with Store(live.db) as store:
            unchecked = store.add_command(
                live.run.run_id, "set_optimizer", {"lr": 0.5, "schedule": "scale"}, "test"
            )
        live.gate.release(4)
        live.gate.wait(5)
        taken = live.client.set_lr(0.5)["uuid"]  # the schedule gives 0.0015 here: a peak of 1
        live.gate.release(5)
        live.join()
        failed, applied = live.client.command(unchecked["uuid"]), live.client.command(taken)
    assert failed["status"] == "failed" and failed["step"] == 4 and "above the lr bound" in failed["error"]
    used = live.recorder.lr
    assert used[5] == pytest.approx(scheduled("cosine", 10, 5), rel=1e-9)  # the schedule went on as it was
    assert applied["status"] == "success" and applied["result"]["schedule"]["peak_lr"] == pytest.approx(1.0)
    assert max(used.values()) == pytest.approx(1.0)


def test_scale_at_the_start_of_a_warm_up_sets_the_peak(tmp_path):
    """At step 0 of a warm-up the schedule gives 0: no factor leads there to 0.01, so 0.01 becomes the
    schedule's base (its peak), as if the run had started with it; the journal says the lr is 0 now."""
    live = LiveRun(tmp_path, overrides("linear", 5))
    try:
        uuid = live.client.set_lr(NEW)["uuid"]  # before training: applied at step 0
        live.start()
        live.join()
        row = live.client.command(uuid)
    finally:
        live.__exit__(None, None, None)
    assert row["status"] == "success" and row["step"] == 0
    info = row["result"]["schedule"]
    assert info["mode"] == "scale" and info["rebased"] is True and info["lr"] == 0.0
    assert (info["peak_lr"], info["peak_step"]) == (pytest.approx(NEW), 6)
    for step in range(1, STEPS + 1):
        assert live.recorder.lr[step] == pytest.approx(NEW * multiplier("linear", 5, step - 1), rel=1e-9)


def test_a_held_lr_travels_with_checkpoints_and_scales(tmp_path):
    """The hold is scheduler state: a branch from a checkpoint saved before it follows the schedule again,
    one saved after it holds; a "scale" on a held lr scales the held value."""
    kind, warmup = "cosine", 4
    with LiveRun(tmp_path, overrides(kind, warmup), gates=[2, 5, 8, 12, 15]) as live:
        tools = BridgeTools(live.client)
        live.gate.wait(2)
        live.client.save_checkpoint("pre")
        live.gate.release(2)
        live.gate.wait(5)
        held = tools.set_lr(NEW, schedule="constant")["uuid"]
        live.client.save_checkpoint("held")
        live.gate.release(5)
        live.gate.wait(8)
        live.client.load_checkpoint("pre", branch="from-pre")
        live.gate.release(8)
        live.gate.wait(12)
        live.client.load_checkpoint("held", branch="from-held")
        live.gate.release(12)
        live.gate.wait(15)
        doubled = tools.set_lr(2 * NEW)["uuid"]
        live.gate.release(15)
        live.join()
        rows = [live.client.command(u) for u in (held, doubled)]
    assert [(r["status"], r["step"]) for r in rows] == [("success", 5), ("success", 15)]
    assert rows[1]["result"]["schedule"]["factor"] == pytest.approx(2.0)
    used = live.recorder.lr
    assert [used[s] for s in (6, 7, 8)] == [NEW] * 3
    # Steps 9-12 run on the branch from "pre": the scheduler is back at its step 2, unheld.
    for k, step in enumerate(range(9, 13)):
        assert used[step] == pytest.approx(BASE * multiplier(kind, warmup, 2 + k), rel=1e-9), step
    # From "held" (saved right after the hold): held again, then doubled at step 15.
    assert [used[s] for s in (13, 14, 15)] == [NEW] * 3
    assert all(used[s] == pytest.approx(2 * NEW, rel=1e-12) for s in range(16, STEPS + 1))


def test_schedule_needs_a_known_value_and_an_lr(tmp_path):
    registry = default_registry()
    for args in (
        {"lr": 0.1, "schedule": "hold"},
        {"schedule": "constant"},
        {"weight_decay": 0.1, "schedule": "scale"},
    ):
        with pytest.raises(InvalidCommand):
            registry.parse("set_optimizer", args)
    with LiveRun(tmp_path, overrides("constant", 0), gates=[1]) as live:
        live.gate.wait(1)
        with pytest.raises(BridgeHTTPError) as refused:
            live.client.set_optimizer(weight_decay=0.1, schedule="constant")
        assert refused.value.status_code == 422 and "needs lr" in str(refused.value)
        live.gate.release(1)
        live.join()
        assert live.client.commands() == []  # nothing was queued


def test_constant_refuses_a_scheduler_it_cannot_hold():
    """ReduceLROnPlateau changes the lr from the metrics it sees: no lambda to hold; a clear error, and
    nothing changed."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params, lr=BASE)
    plateau = get_scheduler("reduce_lr_on_plateau", optimizer)
    with pytest.raises(CommandError, match="constant' needs a LambdaLR scheduler.*ReduceLROnPlateau"):
        optim.set_lr(optimizer, plateau, NEW, "constant")
    assert optimizer.param_groups[0]["lr"] == BASE
    # "scale" still works there: the lr is the groups' own, which the plateau scheduler multiplies.
    assert optim.set_lr(optimizer, plateau, NEW, "scale")["lr"] == NEW


def test_a_resumed_scheduler_adopts_the_hold(tmp_path):
    """The Trainer resuming a run loads scheduler.pt into a fresh, unwrapped scheduler (weights only) before
    training begins; make_holdable then picks the hold up, so the resumed run keeps holding."""

    def fresh():
        params = [torch.nn.Parameter(torch.zeros(2))]
        optimizer = torch.optim.AdamW(params, lr=BASE)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=4, num_training_steps=STEPS)

    optimizer, scheduler = fresh()
    assert optim.make_holdable(scheduler)
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    optim.set_lr(optimizer, scheduler, NEW, "constant")
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")

    optimizer, scheduler = fresh()
    scheduler.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert optim.make_holdable(scheduler)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(NEW)


def test_the_peak_is_looked_for_within_a_horizon_not_over_every_declared_step():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from selfsteer.trainer_bridge.optim import PEAK_HORIZON, peak_ahead

    weight = torch.nn.Parameter(torch.zeros(1))
    scheduler = get_cosine_schedule_with_warmup(torch.optim.AdamW([weight], lr=0.003), 10, 10**9)
    calls = []
    lambda_ = scheduler.lr_lambdas[0]
    scheduler.lr_lambdas[0] = lambda step: calls.append(step) or lambda_(step)
    # A run declaring a billion steps: the fuzz found one such command that grew the process to 23 GB.
    assert peak_ahead(scheduler, 10**9) == (pytest.approx(0.003), 10)  # the warm-up's end, 10 steps on
    assert len(calls) == PEAK_HORIZON
    assert peak_ahead(scheduler, 0) is None
