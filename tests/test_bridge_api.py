"""The control server over real HTTP and WebSocket on loopback: bad input, finished runs, unknown
uuids, auth, CORS, events, and clients that misbehave without touching training."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading

import httpx
import pytest
from helpers.live_run import LiveRun, serving
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.client import AsyncBridgeClient, BridgeClient, BridgeHTTPError
from selfsteer.trainer_bridge.config import BridgeConfig

BAD_COMMANDS = [
    ({"type": "launch_missiles"}, "unknown command type"),
    ({"type": "set_optimizer", "args": {}}, "at least one of"),
    ({"type": "set_optimizer", "args": {"lr": -0.1}}, "greater than or equal to 0.00000001"),
    ({"type": "set_optimizer", "args": {"lr": 1e-9}}, "greater than or equal to 0.00000001"),
    ({"type": "set_optimizer", "args": {"lr": 1.5}}, "less than or equal to 1"),
    ({"type": "set_optimizer", "args": {"lr": "0.1"}}, "valid number"),
    ({"type": "set_optimizer", "args": {"lr": True}}, "valid number"),
    ({"type": "set_optimizer", "args": {"lr": 0.1, "nesterov": True}}, "Extra inputs"),
    ({"type": "set_optimizer", "args": {"betas": [0.9]}}, "betas"),
    ({"type": "set_optimizer", "args": {"momentum": 0.9}}, "has no momentum"),
    ({"type": "set_max_grad_norm", "args": {}}, '"args", "value"], "msg": "Field required"'),
    ({"type": "load_checkpoint", "args": {"checkpoint": "x", "branch": "main"}}, "first branch"),
    ({"type": "save_checkpoint", "args": {"name": "../../etc"}}, "pattern"),
    ({"type": "pause", "args": {"now": 1}}, "Extra inputs"),
    ({"type": "pause", "args": [1]}, "valid dictionary"),
    ({"args": {}}, "type"),
]


def test_bad_input_finished_runs_and_unknown_uuids(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=6"], gates=[2]) as live:
        live.gate.wait(2)  # the optimizer exists: momentum on AdamW is refused up front
        http = httpx.Client(base_url=live.run.url)
        for body, reason in BAD_COMMANDS:
            response = http.post("/api/commands", json=body)
            assert response.status_code == 422, body
            assert reason in json.dumps(response.json()["detail"]), (body, response.json())
        # NaN is not JSON, but Python clients send it anyway.
        raw = '{"type": "set_optimizer", "args": {"lr": NaN}}'
        response = http.post("/api/commands", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422 and "finite" in response.text
        assert live.client.commands() == []  # nothing was queued
        assert http.get("/api/commands/0123abcd").status_code == 404
        with pytest.raises(BridgeHTTPError) as err:
            live.client.command("nope")
        assert err.value.status_code == 404
        live.gate.release(2)
        live.join()
        with pytest.raises(BridgeHTTPError) as err:
            live.client.set_lr(0.1)
        assert err.value.status_code == 409 and "finished" in str(err.value.detail)
        assert http.get("/api/state").json()["phase"] == "finished"
        http.close()


def test_events_stream_and_misbehaving_clients(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=25"], gates=[1]) as live, contextlib.ExitStack() as stack:
        url = live.run.url.replace("http", "ws") + "/api/events"
        received: list[dict] = []
        subscribed = threading.Event()

        def listen():
            for event in BridgeClient(live.run.url).events():
                received.append(event)
                subscribed.set()
                if event["event"] == "state" and event["state"]["phase"] in ("finished", "stopped"):
                    return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        # Clients that never read (their queues fill up), and one that vanishes without a close handshake.
        for _ in range(5):
            stack.enter_context(connect(url, max_queue=1, close_timeout=0.1))
        rude = stack.enter_context(connect(url, close_timeout=0.1))
        rude.recv()
        rude.socket.shutdown(socket.SHUT_RDWR)
        rude.socket.close()
        assert subscribed.wait(10)
        live.gate.wait(1)
        uuid = live.client.evaluate()["uuid"]
        live.gate.release(1)
        summary = live.join()
        listener.join(30)

    assert summary["steps"] == 25
    kinds = [event["event"] for event in received]
    assert kinds[0] == "state" and "metrics" in kinds and "command" in kinds
    points = [p for event in received if event["event"] == "metrics" for p in event["points"]]
    steps = [p["step"] for p in points if "loss" in p["values"]]
    assert steps == list(range(1, 26))
    statuses = [
        e["command"]["status"] for e in received if e["event"] == "command" and e["command"]["uuid"] == uuid
    ]
    assert statuses == ["pending", "running", "success"]


def test_token_cors_and_page(tmp_path):
    with pytest.raises(ValueError, match="needs a bearer token"):
        Bridge(BridgeConfig(host="0.0.0.0", port=0, db=tmp_path / "a.sqlite"))

    bridge = Bridge(BridgeConfig(host="0.0.0.0", port=0, token="s3cret", db=tmp_path / "b.sqlite"))
    try:
        base = f"http://127.0.0.1:{bridge.server.port}"
        assert httpx.get(base + "/api/state").status_code == 401
        assert httpx.get(base + "/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with BridgeClient(base, token="s3cret") as client:
            assert client.state()["phase"] == "created"
            queued = client.pause()
            assert client.command(queued["uuid"])["status"] == "pending"
        ws = base.replace("http", "ws") + "/api/events"
        for refused in (ws, ws + "?token=wrong"):
            # The server closes before accepting (code 1008); before the handshake completes, ASGI turns
            # that into an HTTP 403 refusal of the upgrade.
            with pytest.raises(InvalidStatus) as refusal:
                connect(refused, open_timeout=10)
            assert refusal.value.response.status_code == 403, refused
        # The dashboard's page loads without the token (it asks for it); no data does.
        assert httpx.get(base + "/").status_code == 200
        for path in ("/api/info", "/api/runs", "/api/decisions", "/api/state", "/api/commands", "/docs", "/openapi.json"):  # every GET route on one line # fmt: skip
            response = httpx.get(base + path)
            assert response.status_code == 401, path
            assert response.json() == {"detail": "missing or wrong bearer token"}, path
        # The public prefix does not reach the API: a path sent as is (httpx would fold the "..").
        for path in ("/assets/../api/state", "/assets/%2e%2e/api/state", "/assets/..%2fapi/state"):
            status, body = raw_get(bridge.server.port, path)
            assert status == 404 and "phase" not in body, (path, status, body)
        with connect(base.replace("http", "ws") + "/api/events?token=s3cret") as ws:
            assert json.loads(ws.recv())["event"] == "state"
    finally:
        bridge.close()

    bridge = Bridge(BridgeConfig(port=0, db=tmp_path / "c.sqlite"))
    try:
        base = bridge.url
        page = httpx.get(base + "/")
        assert page.status_code == 200 and "selfsteer" in page.text
        evil = httpx.get(base + "/api/state", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in evil.headers
        same = httpx.get(base + "/api/state", headers={"Origin": base})
        assert same.headers["access-control-allow-origin"] == base
        with pytest.raises(InvalidStatus) as refusal:  # a page of another site cannot subscribe
            connect(base.replace("http", "ws") + "/api/events", origin="http://evil.example", open_timeout=10)
        assert refusal.value.response.status_code == 403
        with connect(base.replace("http", "ws") + "/api/events", origin=base) as ws:  # its own page can
            assert json.loads(ws.recv())["event"] == "state"
    finally:
        bridge.close()


def test_async_client(tmp_path):
    bridge = Bridge(BridgeConfig(port=0, db=tmp_path / "d.sqlite"))

    async def main():
        async with AsyncBridgeClient(bridge.url, source="agent:test") as client:
            state = await client.state()
            sent = await client.set_optimizer(lr=0.01, betas=(0.9, 0.99))
            row = await client.command(sent["uuid"])
            types = [t["type"] for t in await client.command_types()]
            async for event in client.events():
                return state, row, types, event

    try:
        state, row, types, event = asyncio.run(main())
    finally:
        bridge.close()
    assert state["phase"] == "created" and event["event"] == "state"
    assert row["source"] == "agent:test" and row["args"] == {"lr": 0.01, "betas": [0.9, 0.99]}
    assert {"set_optimizer", "load_checkpoint", "reload_data", "evaluate"} <= set(types)


def test_store_views_for_the_dashboard_history(tmp_path):
    """/api/info, /api/decisions and /api/runs/...: what the dashboard reads besides the live API, over
    a live server and over `create_history_app` (no run)."""
    from selfsteer.trainer_bridge.records import NewDecision
    from selfsteer.trainer_bridge.server import create_history_app
    from selfsteer.trainer_bridge.store import Store

    with LiveRun(tmp_path, ["training.max_steps=12", "training.eval_steps=10"], gates=[11]) as live:
        live.gate.wait(11)
        run_id = live.bridge.run_id
        with Store(live.db) as store:
            first = store.add_decision(
                run_id,
                NewDecision(
                    step=10, agent="llm", action="halve", explanation="rising", observation={"big": 1}
                ),
            )
            store.add_metrics(run_id, [{"step": 999, "name": "loss", "value": float("nan")}])
        base = live.run.url
        assert httpx.get(base + "/api/info").json() == {"mode": "live", "run_id": run_id, "version": "0.1.0"}
        (decision,) = httpx.get(base + "/api/decisions").json()
        assert decision["action"] == "halve" and decision["explanation"] == "rising"
        assert "observation" not in decision  # large; `selfsteer decisions export` has it
        assert httpx.get(base + f"/api/decisions?after_id={first}").json() == []
        assert httpx.get(base + "/api/decisions?after_id=-1").status_code == 422
        live.gate.release(11)
        live.join()

    with Store(live.db) as store, serving(create_history_app(store, [], token=None)) as base:
        other = store.create_run("other", "reflect")
        client = httpx.Client(base_url=base)
        assert client.get("/api/info").json()["mode"] == "history"
        runs = client.get("/api/runs").json()
        assert [r["id"] for r in runs] == [other, run_id] and all("config" not in r for r in runs)
        assert client.get(f"/api/runs/{run_id}").json()["config"]["recipe"]["name"] == "tiny"
        assert client.get("/api/runs?kind=train").json()[0]["id"] == run_id
        metrics = client.get(f"/api/runs/{run_id}/metrics", params={"name": "loss", "since": 10}).json()
        assert [(m["step"], m["value"]) for m in metrics][-1] == (999, None)  # NaN travels as null
        assert [d["id"] for d in client.get(f"/api/runs/{run_id}/decisions").json()] == [first]
        assert [b["name"] for b in client.get(f"/api/runs/{run_id}/branches").json()] == ["main"]
        assert client.get(f"/api/runs/{run_id}/commands").json() == []
        assert client.get("/api/runs/nope/metrics").status_code == 404
        assert client.get("/api/state").status_code == 404  # no live run here
        client.close()


def raw_get(port: int, path: str) -> tuple[int, str]:
    """GET with the path exactly as given (no client-side normalisation of "..")."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_decisions_are_recorded_through_the_server(tmp_path):
    """A supervisor attached by URL records, completes and recalls its decisions through the run's
    server: a repeat under a key returns the first, a bad one is refused whole."""
    from selfsteer.trainer_bridge.records import DecisionUpdate, NewDecision
    from selfsteer.trainer_bridge.store import Store

    with LiveRun(tmp_path, ["training.max_steps=12", "training.eval_steps=10"], gates=[11]) as live:
        live.gate.wait(11)
        client = BridgeClient(live.run.url, source="rule")
        new = NewDecision(step=10, agent="rule", action="halve", explanation="rising", lr_before=3e-3,
                          lr_after=1.5e-3, observation={"step": 10, "loss": "nan"}, key="k1")  # the decision posted under key k1 # fmt: skip
        first = client.record_decision(new)
        assert (first.action, first.run_id, first.lr_after) == ("halve", live.bridge.run_id, 1.5e-3)
        assert client.record_decision(new.model_copy(update={"action": "double"})).id == first.id
        for bad in (
            {**new.model_dump(), "action": "triple"},
            {"step": -1, "agent": "rule", "action": "keep"},
        ):
            assert httpx.post(live.run.url + "/api/decisions", json=bad).status_code == 422
        nan = '{"step": 1, "agent": "rule", "action": "keep", "observation": {"loss": NaN}}'
        assert httpx.post(live.run.url + "/api/decisions", content=nan).status_code == 422
        for bad in (
            {"step": "1", "agent": "rule", "action": "keep"},
            {"step": 1, "agent": "rule", "action": "keep", "spare": 1},
        ):
            assert httpx.post(live.run.url + "/api/decisions", json=bad).status_code == 422, bad
        orphan = {"step": 1, "agent": "rule", "action": "keep", "retry_of": first.id + 1}
        assert httpx.post(live.run.url + "/api/decisions", json=orphan).status_code == 404
        assert [d.id for d in client.decisions()] == [first.id]
        assert [d.id for d in client.decisions(key="k1")] == [first.id] and client.decisions(key="k2") == []

        done = client.update_decision(first.id, DecisionUpdate(outcome={"loss_change": 0.1}))
        assert done.outcome == {"loss_change": 0.1} and not done.rolled_back
        assert client.reflections() == []
        failed = client.update_decision(
            first.id,
            DecisionUpdate(reflection="halving stalled it", outcome={"loss_change": 0.5}, rolled_back=True),
        )
        assert (failed.reflection, failed.rolled_back) == ("halving stalled it", True)
        assert [(r.id, r.reflection) for r in client.reflections(agent="rule")] == [
            (first.id, "halving stalled it")
        ]
        assert client.reflections(agent="llm") == []
        with pytest.raises(BridgeHTTPError) as missing:
            client.update_decision(first.id + 1, DecisionUpdate(outcome={}))
        assert missing.value.status_code == 404
        client.close()

        async def the_async_client_mirrors_it():
            async with AsyncBridgeClient(live.run.url, source="rule") as aclient:
                second = await aclient.record_decision(new.model_copy(update={"step": 11, "key": "k2"}))
                await aclient.update_decision(second.id, DecisionUpdate(outcome={"loss_change": -0.1}))
                assert [d.id for d in await aclient.decisions()] == [first.id, second.id]
                assert [d.outcome for d in await aclient.decisions(key="k2")] == [{"loss_change": -0.1}]
                assert [r.id for r in await aclient.reflections()] == [first.id]

        asyncio.run(the_async_client_mirrors_it())
        live.gate.release(11)
        live.join()
    with Store(live.db) as store:
        row = store.list_decisions(live.bridge.run_id)[0]
    assert row["observation"] == {"step": 10, "loss": "nan"} and row["key"] == "k1"


def test_a_state_that_cannot_be_read_is_an_error_on_the_event_socket_not_a_disconnect(tmp_path, caplog):
    """The first event of a subscription is the run's state: when reading it fails, that is the server's
    error, logged as one, and the client is told (close code 1011, internal error)."""
    from websockets.exceptions import ConnectionClosedError

    bridge = Bridge(BridgeConfig(port=0, db=tmp_path / "e.sqlite"))

    def broken_state():
        raise RuntimeError("state is broken")

    try:
        bridge.state = broken_state
        url = bridge.url.replace("http", "ws") + "/api/events"
        with (
            caplog.at_level("ERROR", logger="selfsteer.trainer_bridge.server"),
            connect(url, open_timeout=10) as ws,
            pytest.raises(ConnectionClosedError) as closed,
        ):
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1011
        assert any("state is broken" in (r.exc_text or "") for r in caplog.records), caplog.text
    finally:
        del bridge.state
        bridge.close()
