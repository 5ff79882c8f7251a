"""Replay: a recorded run re-run with its journaled commands at the same steps ends with the same
final eval loss (CPU, same seed) to 1e-6."""

from __future__ import annotations

import json

from helpers.live_run import LiveRun

from selfsteer.cli.main import main
from selfsteer.trainer_bridge.store import Store


def test_replay_reproduces_the_final_eval_loss(tmp_path, capsys):
    overrides = ["training.max_steps=30", "training.lr_scheduler_type=linear", "training.use_cpu=true"]
    with LiveRun(tmp_path, overrides, gates=[4, 9, 15, 22]) as live:
        c = live.client
        live.gate.wait(4)
        c.set_optimizer(lr=0.006, weight_decay=0.1)
        c.save_checkpoint("a")
        c.pause()
        live.gate.release(4)
        c.wait(c.resume()["uuid"])  # applied while paused at step 4
        live.gate.wait(9)
        c.set_max_grad_norm(0.3)
        c.evaluate()
        c.reload_data()
        c.load_checkpoint("missing")  # fails; a replay leaves it out
        live.gate.release(9)
        live.gate.wait(15)
        c.load_checkpoint("a", branch="b")
        live.gate.release(15)
        live.gate.wait(22)
        c.set_optimizer(betas=(0.8, 0.9), eps=1e-7)
        live.gate.release(22)
        original = live.join()
        journal = c.commands()

    assert main(["replay", original["run_id"][:10], "--db", str(live.db), "--out", str(tmp_path / "r")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["match"] and report["abs_diff"] <= 1e-6
    replayed = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert abs(replayed["final_eval_loss"] - original["final_eval_loss"]) <= 1e-6
    assert replayed["steps"] == original["steps"] == 30 and replayed["branch"] == "b"

    # The replay's own journal: the same commands at the same steps, minus pause/resume and failures.
    def applied(rows):
        keep = [r for r in rows if r["status"] == "success" and r["type"] not in ("pause", "resume")]
        return [(r["type"], r["args"], r["step"]) for r in keep]

    with Store(live.db) as store:
        replay_run = store.get_run(replayed["run_id"])
        replay_journal = store.list_commands(replayed["run_id"])
    assert replay_run["kind"] == "replay" and replay_run["parent_run_id"] == original["run_id"]
    assert {r["source"] for r in replay_journal} == {"replay"}
    assert applied(replay_journal) == applied(journal)
    assert len(applied(journal)) == 7
