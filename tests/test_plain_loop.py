"""A plain PyTorch loop steered through `selfsteer.attach`: real loops, a real control server on
loopback, a real SQLite store. The commands are sent over HTTP from inside the loop's body at a chosen
iteration, so each applies at the next boundary, whatever the machine's speed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import selfsteer
from selfsteer.trainer_bridge.checkpoints import list_checkpoints
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.store import Store
from tests.helpers.polling import wait_for

ROOT = Path(__file__).resolve().parents[1]
PEAK, WARMUP, STEPS = 0.01, 4, 20


def get_lr(it: int) -> float:
    """The loop's own schedule: a warm-up, then a linear decay (never the same value twice)."""
    return PEAK * (it + 1) / WARMUP if it < WARMUP else PEAK * max(0.1, 1 - 0.04 * (it - WARMUP))


def run_loop(tmp_path: Path, actions: dict, max_steps: int = STEPS, before=None, **attach_kwargs) -> tuple:
    """Trains a tiny regression model in a nanoGPT-style loop. `actions[it](client, steer)` runs in the
    body of iteration `it` (after the optimizer step); `before(steer)` before the loop starts. Returns
    (steer, the run's metrics by branch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK)
    target = torch.randn(8, 1)

    def batch():
        x = torch.randn(16, 8)  # the global RNG: a rollback must restore it for the same batches
        return x, x @ target

    def evaluate():
        with torch.no_grad():
            x = torch.linspace(-1, 1, 64).reshape(8, 8).repeat(2, 1)
            return {"loss": F.mse_loss(model(x), x @ target).item()}

    steer = selfsteer.attach(
        model, optimizer, max_steps=max_steps, evaluate=evaluate, port=0, db=tmp_path / "runs.db",
        output_dir=tmp_path / "out", max_grad_norm=1.0, announce=False, **attach_kwargs,
    )  # the plain loop's attach settings # fmt: skip
    client = BridgeClient(steer.url)
    seen_norms = []
    if before is not None:
        before(steer)
    try:
        for it in steer.steps():
            lr = steer.lr(get_lr(it))
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch()
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            seen_norms.append((it, steer.max_grad_norm))
            torch.nn.utils.clip_grad_norm_(model.parameters(), steer.max_grad_norm)
            optimizer.step()
            steer.log(loss=loss.item(), learning_rate=lr)
            if it in actions:
                actions.pop(it)(client, steer)
        assert not actions, f"iterations never reached: {sorted(actions)}"
        store = Store(tmp_path / "runs.db")
        by_branch: dict[str, dict[str, dict[int, float]]] = {}
        for row in store.get_metrics(steer.bridge.run_id):
            by_branch.setdefault(row["branch"], {}).setdefault(row["name"], {})[row["step"]] = row["value"]
        steer.seen_norms = seen_norms
        steer.store = store
        return steer, by_branch
    finally:
        client.close()


def test_a_new_lr_sticks_through_the_loops_own_schedule(tmp_path):
    sent = {}

    def set_scale(client, steer):
        sent["scale"] = client.set_lr(0.004)["uuid"]

    def set_constant(client, steer):
        sent["constant"] = client.set_lr(0.002, schedule="constant")["uuid"]

    steer, metrics = run_loop(tmp_path, {3: set_scale, 9: set_constant})
    lrs = metrics["main"]["learning_rate"]
    scale = steer.store.get_command(sent["scale"])
    assert scale["status"] == "success" and scale["step"] == 4
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


@pytest.mark.parametrize("memory", [False, True], ids=["on-disk", "in-memory"])
def test_a_rollback_restores_weights_optimizer_lr_and_rng_and_the_loop_goes_on_from_the_checkpoint(
    tmp_path, memory
):
    sent = {}
    actions = {
        5: lambda client, steer: client.save_checkpoint("at-6", memory=memory),
        7: lambda client, steer: client.set_lr(0.03),  # after the checkpoint: a rollback must undo it
        10: lambda client, steer: sent.setdefault(
            "load", client.load_checkpoint("at-6", branch="retry")["uuid"]
        ),
    }
    steer, metrics = run_loop(tmp_path, actions)
    load = steer.store.get_command(sent["load"])
    assert load["status"] == "success", load
    assert (
        load["step"] == 11 and load["result"]["checkpoint_step"] == 6 and load["result"]["continues_at"] == 6
    )
    main, retry = metrics["main"], metrics["retry"]
    assert sorted(main["loss"]) == list(range(11))  # main ran steps 0..10, then the run forked
    assert sorted(retry["loss"]) == list(range(6, STEPS))  # the branch went on from the checkpoint's step
    # Steps 6 and 7 ran with the lr of the checkpoint on both branches: the same batches (RNG), the same
    # weights and optimizer state give the very same losses; step 8 is the first the raised lr changed
    # on main (its weights after step 8 differ), and on the branch the lr is the checkpoint's again.
    for it in (6, 7, 8):
        assert retry["loss"][it] == main["loss"][it]
        assert retry["learning_rate"][it] == pytest.approx(get_lr(it), rel=1e-12)
    assert main["learning_rate"][8] == pytest.approx(get_lr(8) * 0.03 / get_lr(7), rel=1e-9)
    assert retry["loss"][9] != main["loss"][9]
    state = steer.bridge.state()
    assert state["branch"] == "retry" and state["step"] == STEPS and state["phase"] == "finished"
    (saved,) = list_checkpoints(steer.store, steer.bridge.run_id)
    assert saved.get("memory", False) is memory and (saved["path"] is None) is memory
    assert (tmp_path / "out" / "checkpoints" / "at-6").exists() is not memory


def test_pause_evaluate_max_grad_norm_and_stop_apply_at_the_next_boundary(tmp_path):
    outcome = {}

    def supervise(client):
        paused = wait_for(lambda: (s := client.state())["paused"] and s, "the pause at step 4")
        outcome["paused_at"] = paused["step"]
        outcome["norm"] = client.wait(client.set_max_grad_norm(0.5)["uuid"])
        outcome["eval"] = client.wait(client.evaluate()["uuid"])
        client.resume()

    def pause(client, steer):
        client.pause()
        threading.Thread(target=supervise, args=(BridgeClient(steer.url),), daemon=True).start()

    actions = {3: pause, 8: lambda client, steer: client.stop()}
    steer, metrics = run_loop(tmp_path, actions)
    assert outcome["paused_at"] == 4
    assert outcome["norm"]["status"] == "success" and outcome["norm"]["step"] == 4
    assert outcome["eval"]["status"] == "success" and outcome["eval"]["step"] == 4
    assert metrics["main"]["eval_loss"][4] == pytest.approx(outcome["eval"]["result"]["eval_loss"])
    assert dict(steer.seen_norms)[3] == 1.0 and dict(steer.seen_norms)[4] == 0.5  # the loop read it
    assert steer.step == 9 and max(metrics["main"]["loss"]) == 8  # stopped at the boundary after 8
    assert steer.store.get_run(steer.bridge.run_id)["status"] == "stopped"


def test_the_steering_state_travels_in_the_loops_own_checkpoint(tmp_path):
    steer, _ = run_loop(
        tmp_path, {2: lambda client, steer: client.set_lr(0.02, schedule="constant")}, max_steps=5
    )
    saved = steer.state_dict()
    assert saved["step"] == 5 and saved["lr"]["held"] == 0.02
    model = nn.Linear(2, 1)
    again = selfsteer.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), max_steps=8, port=None,
                             db=tmp_path / "runs.db", output_dir=tmp_path / "again")  # a second attach on the same model # fmt: skip
    again.load_state_dict(saved)
    assert list(again.steps()) == [5, 6, 7]  # goes on from the saved step
    assert again.lr(0.5) == 0.02  # with the steered lr


def test_the_example_plain_loop_runs_and_obeys_commands(tmp_path):
    """`python examples/plain_loop.py --port 0 --max-steps N`: prints its URL once listening, logs loss,
    eval_loss and learning_rate, and applies what it is sent (held at step 0 so that every command has
    its place)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "plain_loop.py"), "--port", "0", "--max-steps", "30",
         "--eval-interval", "10", "--start-paused", "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db")],
        stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # the example's command line as typed # fmt: skip
    try:
        line = process.stderr.readline()
        assert " is served at http://127.0.0.1:" in line, line
        client = BridgeClient(line.rsplit(" ", 1)[1].strip().rstrip("/"))
        assert client.state()["paused"] and client.state()["step"] == 0
        uuids = [
            client.set_lr(0.001, schedule="constant")["uuid"],
            client.save_checkpoint("start")["uuid"],
            client.evaluate()["uuid"],
            client.set_max_grad_norm(0.5)["uuid"],
            client.resume()["uuid"],
        ]
        assert process.wait(timeout=120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    store = Store(tmp_path / "r.db")
    (run,) = store.list_runs()
    assert run["status"] == "finished"
    journal = {c["uuid"]: c for c in store.list_commands(run["id"])}
    assert all(journal[u]["status"] == "success" and journal[u]["step"] == 0 for u in uuids)
    names = {row["name"] for row in store.get_metrics(run["id"])}
    assert {"loss", "eval_loss", "learning_rate"} <= names
    lrs = [row["value"] for row in store.get_metrics(run["id"], names=["learning_rate"])]
    assert len(lrs) == 30 and set(lrs) == {0.001}
    evals = [row["step"] for row in store.get_metrics(run["id"], names=["eval_loss"])]
    assert evals == [0, 0, 10, 20, 30]  # the evaluate command, then every 10 steps
    assert (tmp_path / "out" / "checkpoints" / "start" / "model.safetensors").is_file()


def test_a_supervisor_over_http_steers_a_plain_loop_to_its_end(tmp_path):
    """`selfsteer supervise --url` on a plain loop: a decision on each evaluation, its lr change applied at
    a boundary; when the loop ends its server goes, and the supervisor ends quietly. The loop waits, after
    the evaluations at steps 10, 20 and 30, for the decision about them (as `hold_for_supervisor` does)."""
    from selfsteer.agents.registry import make_supervisor
    from selfsteer.graphs.supervise import run_supervision

    outcome = {}

    def supervise(url):
        try:
            outcome["result"] = run_supervision(
                url, make_supervisor("rule"), db=str(tmp_path / "graph.sqlite")
            )
        except BaseException as error:  # noqa: BLE001  (the test reports it)
            outcome["error"] = error

    thread = None

    def start(steer):
        nonlocal thread
        thread = threading.Thread(target=supervise, args=(steer.url,), daemon=True)
        thread.start()

    def decided_on(step):
        def hold(client, steer):
            wait_for(lambda: any(d.step >= step for d in client.decisions()), f"a decision at step {step}")

        return hold

    steer, _ = run_loop(
        tmp_path,
        {10: decided_on(10), 20: decided_on(20), 30: decided_on(30)},
        max_steps=60,
        before=start,
        eval_every=10,
    )
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["result"].get("finished")
    decisions = steer.store.list_decisions(steer.bridge.run_id)
    assert {10, 20, 30} <= {d["step"] for d in decisions}
    for decision in decisions:  # an lr change carries the step its command took effect at, if it did
        command = steer.store.get_command(decision["command"]) if decision["command"] else None
        if command is not None and command["status"] == "success":
            assert decision["applied_step"] == command["step"] >= decision["step"]
        else:  # a keep, or a change the run ended before applying
            assert decision["applied_step"] is None


def test_a_plain_loop_run_replays_from_its_journal(tmp_path):
    """The same loop given `replay_of`: the journaled commands apply again at their steps, and the replay
    trains to the very same losses and lrs."""
    actions = {
        2: lambda client, steer: client.set_lr(0.004),
        6: lambda client, steer: client.set_max_grad_norm(0.1),
        9: lambda client, steer: client.set_lr(0.02, schedule="constant"),
    }
    original, first = run_loop(tmp_path, actions)
    replay, again = run_loop(tmp_path, {}, replay_of=original.bridge.run_id)
    assert again["main"]["learning_rate"] == first["main"]["learning_rate"]
    assert again["main"]["loss"] == first["main"]["loss"]  # bit for bit: same commands, same steps
    replayed = [c for c in replay.store.list_commands(replay.bridge.run_id) if c["source"] == "replay"]
    assert [(c["type"], c["step"], c["status"]) for c in replayed] == [
        ("set_optimizer", 3, "success"),
        ("set_max_grad_norm", 7, "success"),
        ("set_optimizer", 10, "success"),
    ]
    run = replay.store.get_run(replay.bridge.run_id)
    assert run["kind"] == "replay" and run["parent_run_id"] == original.bridge.run_id


def test_a_stop_that_ends_the_run_before_its_post_returns_is_accepted(tmp_path):
    """A held loop wakes on the stop's notice; it must not end the run before `submit` has answered (a
    fresh clone's dashboard test got 409 for a stop that was applied). Here the loop is given that
    chance at the worst point: the stop is answered as accepted, then applied."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    steer = selfsteer.attach(
        model, optimizer, max_steps=1000, port=None, db=tmp_path / "runs.db", output_dir=tmp_path / "out",
        start_paused=True, announce=False,
    )  # a paused loop without a server # fmt: skip

    def loop():
        for _ in steer.steps():
            loss = model(torch.randn(2, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    bridge, notify, this_test = steer.bridge, steer.bridge.notify, threading.current_thread()

    def notify_then_let_the_loop_end():
        notify()
        if threading.current_thread() is this_test:  # submit's notice, not the loop's
            thread.join(timeout=5)  # the loop ends here if it can take the stop before submit answers

    wait_for(lambda: bridge.paused, "the loop to hold at its start")
    bridge.notify = notify_then_let_the_loop_end
    answer = bridge.submit("stop", {}, "test")
    assert answer["status"] == "pending" and answer["repeated"] is False
    thread.join(timeout=60)
    assert not thread.is_alive() and bridge.phase == "stopped"
    assert Store(tmp_path / "runs.db").get_command(answer["uuid"])["status"] == "success"
