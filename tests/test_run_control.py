"""Two roads into a run, one surface: `LocalRunControl` (in process) answers as `BridgeClient` (HTTP) does,
and a supervisor in the run's own process steers it without a single HTTP request."""

from __future__ import annotations

import httpx
import pytest
from helpers.live_run import LiveRun

from selfsteer.agents.registry import make_supervisor
from selfsteer.graphs.supervise import run_supervision
from selfsteer.trainer_bridge.client import BridgeHTTPError
from selfsteer.trainer_bridge.control import LocalRunControl, RunControl
from selfsteer.trainer_bridge.recipe import load_recipe
from selfsteer.trainer_bridge.records import DecisionUpdate, NewDecision
from selfsteer.trainer_bridge.runner import RecipeRun


def test_both_roads_answer_alike(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=12"], gates=[4]) as live:
        live.gate.wait(4)
        local, http = LocalRunControl(live.run.bridge, source="local"), live.client
        assert isinstance(local, RunControl) and isinstance(http, RunControl)
        assert local.state() == http.state() | {"url": local.state()["url"]}
        sent = local.set_lr(0.002)
        assert sent["status"] == "pending" and http.command(sent["uuid"])["source"] == "local"
        for control in (local, http):
            with pytest.raises(BridgeHTTPError) as refused:
                control.set_lr(5.0)  # above the lr bound: refused whole
            assert refused.value.status_code == 422
            with pytest.raises(BridgeHTTPError) as unknown:
                control.command("no-such-uuid")
            assert unknown.value.status_code == 404
        decision = local.record_decision(
            NewDecision(step=4, agent="test", action="double", explanation="why")
        )
        assert [d.id for d in http.decisions()] == [decision.id]
        local.update_decision(decision.id, DecisionUpdate(command=sent["uuid"]))
        with pytest.raises(BridgeHTTPError) as missing:
            local.update_decision(decision.id + 1, DecisionUpdate(outcome={"x": 1}))
        assert missing.value.status_code == 404
        live.gate.release(4)
        row = local.wait(sent["uuid"], timeout=60)  # wakes on the journal's change notice
        assert row["status"] == "success" and row["step"] == 4
        assert http.decisions()[0].applied_step == 4
        live.join()
        assert local.metrics(names=["loss"]) == http.metrics(names=["loss"])
        with pytest.raises(BridgeHTTPError) as over:
            local.pause()
        assert over.value.status_code == 409


def test_a_supervisor_in_the_runs_process_makes_no_http_request(tmp_path, monkeypatch):
    requests = []
    send = httpx.Client.send
    monkeypatch.setattr(
        httpx.Client,
        "send",
        lambda client, request, **kw: requests.append(request.url) or send(client, request, **kw),
    )

    def supervise(control, stop):
        assert isinstance(control, LocalRunControl)
        run_supervision(
            control,
            make_supervisor("rule"),
            db=str(tmp_path / "graph.sqlite"),
            stop_event=stop,
            pause_while_deciding=True,
        )

    recipe = load_recipe("tiny", ["training.learning_rate=1.0", "training.max_steps=40"])
    run = RecipeRun(recipe, tmp_path / "out", db=tmp_path / "runs.sqlite", port=0, supervisor=supervise,
                    hold_for_supervisor=True)  # the held run of test_probe's # fmt: skip
    try:
        summary = run.train()
    finally:
        run.close()
    assert len(summary["decisions"]) >= 3  # an evaluation every 10 steps, each decided on
    assert any(d["action"] == "halve" for d in summary["decisions"])  # lr 1.0 diverges: the rules halve it
    assert requests == []
