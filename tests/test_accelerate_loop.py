"""An accelerate custom loop steered through `selfsteer.attach(..., accelerator=accelerator)`: a real
`Accelerator(cpu=True)` that prepares the model, the optimizer (an `AcceleratedOptimizer`), the data
loader and, in one variant, the lr scheduler (an `AcceleratedScheduler`); `accelerator.backward`,
`accelerator.clip_grad_norm_`; a real control server on loopback and a real SQLite store. The commands are
sent over HTTP from inside the loop's body at a chosen iteration, so each applies at the next boundary.

The batch of iteration `it` is the prepared loader's batch `it % len` plus noise from the global RNG:
a rollback (or `accelerator.load_state`) that restores the RNG gives the very same batches again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import selfsteer
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store

PEAK, WARMUP, STEPS = 0.01, 4, 20


def get_lr(it: int) -> float:
    """The loop's own schedule: a warm-up, then a linear decay (never the same value twice)."""
    return PEAK * (it + 1) / WARMUP if it < WARMUP else PEAK * (1 - 0.04 * (it - WARMUP))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state per process: each test starts from none and leaves none behind."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_loop(
    tmp_path: Path,
    actions: dict,
    max_steps: int = STEPS,
    *,
    at_top: dict | None = None,
    with_scheduler: bool = False,
    load_state: Path | None = None,
    out: str = "out",
) -> tuple:
    """Trains a tiny regression model in an accelerate loop. `actions[it](client, steer, accelerator)`
    runs in the body of iteration `it` after the optimizer step, `at_top[it](...)` before anything else
    in it. with_scheduler: the loop steps an accelerate-prepared LambdaLR instead of asking `steer.lr`.
    load_state: `accelerator.load_state(load_state)` before the loop starts. Returns (steer, accelerator,
    the run's metrics by branch, the losses the loop saw by iteration)."""
    at_top = dict(at_top or {})
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK)
    target = torch.randn(8, 1)
    xs = torch.randn(64, 8)
    loader = DataLoader(TensorDataset(xs, xs @ target), batch_size=16)
    scheduler = None
    if with_scheduler:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: get_lr(it) / PEAK)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        assert isinstance(scheduler, AcceleratedScheduler)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert isinstance(optimizer, AcceleratedOptimizer)
    batches = list(loader)

    def evaluate():
        model.eval()
        with torch.no_grad():
            x = torch.linspace(-1, 1, 64).reshape(8, 8)
            loss = F.mse_loss(model(x), x @ target).item()
        model.train()
        return {"loss": loss}

    steer = selfsteer.attach(
        model, optimizer, max_steps=max_steps, evaluate=evaluate, port=0, db=tmp_path / "runs.db",
        output_dir=tmp_path / out, max_grad_norm=1.0, announce=False, accelerator=accelerator,
        lr_scheduler=scheduler,
    )  # the accelerate loop's attach settings # fmt: skip
    if load_state is not None:
        accelerator.load_state(str(load_state))
    client = BridgeClient(steer.url)
    losses: dict[int, float] = {}
    try:
        for it in steer.steps():
            if it in at_top:
                at_top.pop(it)(client, steer, accelerator)
            if with_scheduler:
                lr = optimizer.param_groups[0]["lr"]
            else:
                lr = steer.lr(get_lr(it))
                for group in optimizer.param_groups:
                    group["lr"] = lr
            x, y = batches[it % len(batches)]
            x = x + 0.1 * torch.randn_like(x)  # the global RNG
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), steer.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses[it] = loss.item()
            steer.log(loss=loss.item(), learning_rate=lr)
            if it in actions:
                actions.pop(it)(client, steer, accelerator)
        assert not actions and not at_top, f"iterations never reached: {sorted(actions)} {sorted(at_top)}"
        store = Store(tmp_path / "runs.db")
        by_branch: dict[str, dict[str, dict[int, float]]] = {}
        for row in store.get_metrics(steer.bridge.run_id):
            by_branch.setdefault(row["branch"], {}).setdefault(row["name"], {})[row["step"]] = row["value"]
        steer.store = store
        return steer, accelerator, by_branch, losses
    finally:
        client.close()


@pytest.mark.parametrize("schedule", ["steer.lr", "prepared LambdaLR"])
def test_a_new_lr_sticks_through_the_loops_own_schedule(tmp_path, schedule):
    with_scheduler = schedule != "steer.lr"
    sent = {}

    def set_scale(client, steer, accelerator):
        sent["scale"] = client.set_lr(0.004)["uuid"]

    def set_constant(client, steer, accelerator):
        sent["constant"] = client.set_lr(0.002, schedule="constant")["uuid"]

    steer, _, metrics, _ = run_loop(tmp_path, {3: set_scale, 9: set_constant}, with_scheduler=with_scheduler)
    lrs = metrics["main"]["learning_rate"]
    scale = steer.store.get_command(sent["scale"])
    assert scale["status"] == "success" and scale["step"] == 4, scale
    if with_scheduler:
        factor = 0.004 / get_lr(4)  # the scheduler knows what it gives the next step: that one gets 0.004
        assert lrs[4] == pytest.approx(0.004, rel=1e-12)
    else:
        factor = 0.004 / get_lr(3)  # relative to what the loop's schedule gave the latest step
    assert scale["result"]["schedule"]["factor"] == pytest.approx(factor)
    for it in range(4):
        assert lrs[it] == pytest.approx(get_lr(it), rel=1e-12)  # before the boundary: untouched
    for it in range(4, 10):
        # The loop's schedule goes on (warm-up end, decay) and every step is scaled by the same factor.
        assert lrs[it] == pytest.approx(get_lr(it) * factor, rel=1e-9)
    assert steer.store.get_command(sent["constant"])["step"] == 10
    for it in range(10, STEPS):
        assert lrs[it] == pytest.approx(0.002, rel=1e-12)  # held, whatever the schedule says
    assert steer.store.get_run(steer.bridge.run_id)["status"] == "finished"


def test_a_rollback_restores_weights_optimizer_lr_and_rng_and_the_loop_goes_on_from_the_checkpoint(tmp_path):
    sent = {}
    actions = {
        5: lambda client, steer, acc: client.save_checkpoint("at-6"),
        7: lambda client, steer, acc: client.set_lr(0.03),  # after the checkpoint: a rollback must undo it
        10: lambda client, steer, acc: sent.setdefault(
            "load", client.load_checkpoint("at-6", branch="retry")["uuid"]
        ),
    }
    steer, accelerator, metrics, _ = run_loop(tmp_path, actions)
    load = steer.store.get_command(sent["load"])
    assert load["status"] == "success", load
    assert (
        load["step"] == 11 and load["result"]["checkpoint_step"] == 6 and load["result"]["continues_at"] == 6
    )
    assert load["result"]["restored"] == {"optimizer": True, "scheduler": True, "rng": True}
    main, retry = metrics["main"], metrics["retry"]
    assert sorted(main["loss"]) == list(range(11))
    assert sorted(retry["loss"]) == list(range(6, STEPS))
    # Steps 6 and 7 ran with the checkpoint's lr on both branches; step 8 is the first the raised lr
    # changed on main. The same batches (RNG), weights and optimizer state give the very same losses.
    for it in (6, 7, 8):
        assert retry["loss"][it] == main["loss"][it]
        assert retry["learning_rate"][it] == pytest.approx(get_lr(it), rel=1e-12)
    assert main["learning_rate"][8] == pytest.approx(get_lr(8) * 0.03 / get_lr(7), rel=1e-9)
    assert retry["loss"][9] != main["loss"][9]
    state = steer.bridge.state()
    assert state["branch"] == "retry" and state["step"] == STEPS and state["phase"] == "finished"
    # The checkpoint holds the unwrapped model's weights under its own names, and the inner optimizer's
    # state (AdamW's, as torch.optim.AdamW.load_state_dict reads it).
    folder = tmp_path / "out" / "checkpoints" / "at-6"
    names = set(load_file(str(folder / "model.safetensors")))
    assert names == set(accelerator.unwrap_model(steer.model).state_dict()) == {
        "0.weight", "0.bias", "2.weight", "2.bias",
    }  # ruff would split the chained == # fmt: skip
    saved_optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert set(saved_optimizer["state"]) == {0, 1, 2, 3} and saved_optimizer["state"][0]["step"] == 6


def test_accelerators_save_state_carries_the_steering_state(tmp_path):
    """`accelerator.save_state(dir)` at the top of an iteration (before its step, as nanoGPT saves) keeps
    the steering state beside the model, the optimizer and the RNG (the adapter registered the Steer
    for checkpointing); `accelerator.load_state(dir)` in a fresh loop goes on from that iteration with
    the steered lr, and trains exactly as the first loop did."""
    state_dir = tmp_path / "state"
    saved = {}

    def save(client, steer, accelerator):
        accelerator.save_state(str(state_dir))
        saved["steer"] = steer.state_dict()

    first, _, metrics, losses = run_loop(
        tmp_path,
        {2: lambda client, steer, acc: client.set_lr(0.02, schedule="constant")},
        max_steps=8,
        at_top={5: save},
    )
    assert saved["steer"]["step"] == 5 and saved["steer"]["lr"]["held"] == 0.02
    assert (state_dir / "custom_checkpoint_0.pkl").is_file()

    again, _, metrics_again, losses_again = run_loop(
        tmp_path, {}, max_steps=8, load_state=state_dir, out="again"
    )
    assert again.bridge.run_id != first.bridge.run_id
    assert sorted(losses_again) == [5, 6, 7]  # goes on from the saved iteration
    assert again.lr(0.5) == 0.02  # with the steered lr, whatever the loop's schedule says
    # The weights, the optimizer and the RNG came back with it: the same losses as the first loop.
    assert [losses_again[it] for it in (5, 6, 7)] == [losses[it] for it in (5, 6, 7)]
    assert set(metrics_again["main"]["learning_rate"].values()) == {0.02}
