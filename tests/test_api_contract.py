"""The control server's contract over real HTTP and WebSocket on loopback (issue 10, fuzzing): what the
fuzzer found, one test each. Bounds where training still works, NaN shown as NaN (and warned of), a journal
that says what was applied, pages instead of whole histories, bodies of bounded size never echoed, an
OpenAPI that declares what the server does, and a token that may need percent-encoding."""

from __future__ import annotations

import json
import math
import threading
from urllib.parse import quote

import httpx
import pytest
import torch
from helpers.live_run import LiveRun, StepGate
from transformers import Trainer, TrainerCallback
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from selfsteer.integrations.hf_trainer import make_interactive
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.client import BridgeClient
from selfsteer.trainer_bridge.commands import (
    BETA_BOUNDS,
    EPS_BOUNDS,
    LR_BOUNDS,
    MAX_GRAD_NORM_BOUNDS,
    MOMENTUM_BOUNDS,
    WEIGHT_DECAY_BOUNDS,
    NoArgs,
)
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.handlers import default_registry
from selfsteer.trainer_bridge.http_errors import MAX_BODY_BYTES
from selfsteer.trainer_bridge.pages import METRICS_PAGE
from selfsteer.trainer_bridge.recipe import build_workload, load_recipe
from selfsteer.trainer_bridge.records import NewDecision
from selfsteer.trainer_bridge.store import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def idle(tmp_path):
    """A bridge serving a run that has not started training: commands are journaled, none applied."""
    bridge = Bridge(BridgeConfig(port=0, db=tmp_path / "idle.sqlite"))
    try:
        yield bridge
    finally:
        bridge.close()


def send(base: str, body: dict) -> httpx.Response:
    return httpx.post(base + "/api/commands", json=body)


# -----------------------------------------------------------------------------
# bounds


REFUSED = [
    ("set_optimizer", {"eps": 5e-324}),  # 0 in float32: with betas [0, 0], 0/0 = NaN in every weight
    ("set_optimizer", {"lr": 5e-324}),
    ("set_optimizer", {"lr": 100.0}),
    ("set_optimizer", {"weight_decay": 1.7e308}),
    ("set_optimizer", {"betas": [0.9, 0.0]}),  # beta1 ** 2 > beta2: NaN after 12 steps of the tiny recipe
    ("set_optimizer", {"betas": [1.0, 1.0]}),
    ("set_optimizer", {"momentum": 1.0}),
    ("set_optimizer", {"lr": None, "weight_decay": None, "betas": None, "eps": None, "momentum": None}),
    ("set_max_grad_norm", {"value": 1.7e308}),
    ("set_max_grad_norm", {"value": 1e-5}),  # 1e-300 is 0 in float32: every gradient scaled to nothing
]
ACCEPTED = [
    ("set_optimizer", {"betas": [0.0, 0.0]}),
    ("set_optimizer", {"betas": [0.9, 0.81]}),
    ("set_optimizer", {"lr": 1.0, "weight_decay": 1.0, "eps": 1e-12}),
    ("set_max_grad_norm", {"value": 0}),  # clipping off
    ("set_max_grad_norm", {"value": 1.0}),
]


def test_arguments_are_bounded_to_where_training_still_works(idle):
    for type, args in REFUSED:
        response = send(idle.url, {"type": type, "args": args})
        assert response.status_code == 422, (type, args, response.text)
    assert BridgeClient(idle.url).commands() == []  # nothing was queued
    for type, args in ACCEPTED:
        assert send(idle.url, {"type": type, "args": args}).status_code == 200, (type, args)
    # The reasons are in the OpenAPI, with the bounds.
    schema = httpx.get(idle.url + "/openapi.json").json()["components"]["schemas"]["SetOptimizerArgs"]
    assert (
        schema["properties"]["lr"]["maximum"] == 1.0
        and "float32" in schema["properties"]["lr"]["description"]
    )
    assert {"required": ["lr"]} in schema["anyOf"]  # at least one setting


def _edges(type: str, name: str, bounds: tuple[float, float], wrap=lambda v: v):
    """Each bound taken, and the float just past it refused."""
    low, high = bounds
    inside = [(type, {name: wrap(low)}), (type, {name: wrap(high)})]
    outside = [
        (type, {name: wrap(math.nextafter(low, -math.inf))}),
        (type, {name: wrap(math.nextafter(high, math.inf))}),
    ]
    return inside, outside


EDGES = [
    _edges("set_optimizer", "lr", LR_BOUNDS),
    _edges("set_optimizer", "weight_decay", WEIGHT_DECAY_BOUNDS),
    _edges("set_optimizer", "eps", EPS_BOUNDS),
    _edges("set_optimizer", "momentum", MOMENTUM_BOUNDS),  # no optimizer yet to say AdamW has none
    _edges("set_optimizer", "betas", BETA_BOUNDS, lambda beta: [0.0, beta]),  # beta2 (beta1 0: no floor)
    _edges("set_optimizer", "betas", BETA_BOUNDS, lambda beta: [beta, BETA_BOUNDS[1]]),  # beta1
    _edges("set_max_grad_norm", "value", MAX_GRAD_NORM_BOUNDS),
]


def test_every_bound_in_the_openapi_is_a_json_schema_keyword(idle):
    """pydantic writes a bound placed after a validator on an optional field as `ge`/`le`, keywords no
    JSON Schema reader knows: the fuzzer then sent a `retry_of` of 0 as valid data (and got 422)."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            found.extend(f"{path}.{key}" for key in ("ge", "le", "gt", "lt") if key in node)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(httpx.get(idle.url + "/openapi.json").json(), "openapi")
    assert found == []


@pytest.mark.parametrize("field", [{"retry_of": 2**63}, {"retry_of": 0}, {"step": 2**63}, {"step": 2**53}])
def test_a_decision_whose_step_or_retry_of_sqlite_cannot_hold_is_refused_not_a_server_error(idle, field):
    """The API fuzzer found a 500: a `retry_of` past SQLite's 64-bit integers overflowed at the lookup."""
    body = {"step": 1, "agent": "fuzz", "action": "keep", **field}
    response = httpx.post(idle.url + "/api/decisions", json=body)
    assert response.status_code == 422, response.text
    assert idle.decisions() == []  # nothing recorded


@pytest.mark.parametrize(
    ("accepted", "refused"),
    EDGES,
    ids=["lr", "weight_decay", "eps", "momentum", "beta2", "beta1", "max_grad_norm"],
)
def test_each_bound_is_in_and_the_next_float_past_it_out(idle, accepted, refused):
    """The bounds hold to the last float: 1e-8 and 1.0 are lrs, math.nextafter of either outwards is not."""
    for type, args in refused:
        response = send(idle.url, {"type": type, "args": args})
        assert response.status_code == 422, (type, args, response.text)
    assert BridgeClient(idle.url).commands() == []  # nothing was queued
    for type, args in accepted:
        response = send(idle.url, {"type": type, "args": args})
        assert response.status_code == 200, (type, args, response.text)


# -----------------------------------------------------------------------------
# NaN: shown as such, warned of within the step, and journaled


class PoisonAt(TrainerCallback):
    """Fills every weight with NaN at the end of one step: from the next step on every loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(math.nan)


def listen(url: str, events: list, subscribed: threading.Event) -> None:
    for event in BridgeClient(url).events():
        events.append(event)
        subscribed.set()
        if event["event"] == "state" and event["state"]["phase"] in ("finished", "stopped", "failed"):
            return


def test_a_nan_loss_is_logged_as_nan_warned_of_at_its_step_and_journaled(tmp_path):
    events: list[dict] = []
    subscribed = threading.Event()
    with LiveRun(tmp_path, ["training.max_steps=9"], gates=[2, 7], callbacks=[PoisonAt(4)]) as live:
        listener = threading.Thread(target=listen, args=(live.run.url, events, subscribed), daemon=True)
        listener.start()
        assert subscribed.wait(30)
        live.gate.wait(2)
        live.gate.release(2)
        live.gate.wait(7)
        evaluation = live.client.evaluate()["uuid"]
        live.gate.release(7)
        live.join()
        listener.join(30)
        losses = {row["step"]: row["value"] for row in live.client.metrics(names=["loss"])}
        row = live.client.command(evaluation)

    # Logged as NaN (null in JSON), never as the Trainer's filtered 0.0.
    assert all(isinstance(losses[step], float) for step in range(1, 5)), losses
    assert all(losses[step] is None for step in range(5, 10)), losses
    # The evaluation was applied: success, its NaN stored as null.
    assert row["status"] == "success" and row["result"]["eval_loss"] is None, row

    warnings = [i for i, e in enumerate(events) if e["event"] == "warning"]
    assert warnings, [e["event"] for e in events]
    first = events[warnings[0]]
    assert first["step"] == 5 and first["kind"] == "not_finite" and first["metrics"]["loss"] is None
    assert first["text"].startswith("not finite: loss nan")  # which kind of non-finite: said in words
    # Within the step: before any metrics of a later step.
    later = [
        i for i, e in enumerate(events) if e["event"] == "metrics" and any(p["step"] > 5 for p in e["points"])
    ]
    assert warnings[0] < later[0]


def test_a_result_that_is_not_json_is_still_journaled_as_applied(tmp_path):
    registry = default_registry()
    applied = []

    @registry.register("opaque", NoArgs, "returns something JSON cannot hold")
    def opaque(ctx, args):
        applied.append(ctx.step)
        return {"object": object(), "nan": math.nan}

    @registry.register("nan", NoArgs, "returns NaN and infinity")
    def nan(ctx, args):
        return {"loss": math.nan, "norms": [1.0, math.inf, -math.inf]}

    workload = build_workload(load_recipe("tiny", ["training.max_steps=6"]), tmp_path / "out")
    hold = StepGate([2])
    trainer = make_interactive(Trainer)(
        model=workload.model,
        args=workload.training_args,
        train_dataset=workload.train_dataset,
        eval_dataset=workload.eval_dataset,
        callbacks=[hold],
        bridge=BridgeConfig(port=0, db=tmp_path / "db.sqlite"),
        commands=registry,
    )
    thread = threading.Thread(target=trainer.train, daemon=True)
    thread.start()
    try:
        hold.wait(2)
        with BridgeClient(trainer.bridge.url) as client:
            first, second = client.send("opaque")["uuid"], client.send("nan")["uuid"]
            hold.release(2)
            thread.join(60)
            first, second = client.command(first), client.command(second)
    finally:
        hold.release_all()
        thread.join(60)
        trainer.bridge.close()
    assert applied == [2]
    assert first["status"] == "success" and "not stored" in first["error"], first
    assert second["status"] == "success" and second["result"] == {"loss": None, "norms": [1.0, None, None]}


# -----------------------------------------------------------------------------
# the token


def test_a_token_that_needs_percent_encoding_works_in_the_query_over_http_and_websocket(tmp_path):
    token = "a/b+c=d"
    bridge = Bridge(BridgeConfig(port=0, token=token, db=tmp_path / "t.sqlite"))
    try:
        base = bridge.url
        encoded = quote(token, safe="")
        assert httpx.get(base + "/api/state", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{base}/api/state?token={encoded}").status_code == 200
        assert httpx.get(base + "/api/state", params={"token": token}).status_code == 200  # httpx encodes
        assert httpx.get(f"{base}/api/state?token={token}").status_code == 401  # "+" is a space there
        ws = base.replace("http", "ws") + "/api/events"
        with connect(f"{ws}?token={encoded}", open_timeout=10) as socket:  # what the dashboard opens
            assert json.loads(socket.recv())["event"] == "state"
        with pytest.raises(InvalidStatus):
            connect(f"{ws}?token={quote('a/b+c=e', safe='')}", open_timeout=10)
    finally:
        bridge.close()


# -----------------------------------------------------------------------------
# request size and echo


def test_large_bodies_are_refused_before_they_are_read_and_input_is_never_echoed(idle):
    url = idle.url + "/api/commands"
    big = b'{"type": "' + b"x" * (1 << 20) + b'"}'
    response = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and str(MAX_BODY_BYTES) in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(64):
            yield b"x" * 4096

    response = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413

    # Under the limit, a long type is refused without coming back.
    long_type = "y" * 30_000
    response = send(idle.url, {"type": long_type, "args": {"lr": "z" * 30_000}})
    assert response.status_code == 422 and len(response.content) < 2_000, len(response.content)
    assert "yyyyyyyyyy" * 30 not in response.text
    response = send(idle.url, {"type": "set_optimizer", "args": {"lr": 1e-3}, "source": "s" * 30_000})
    assert response.status_code == 422 and len(response.content) < 2_000
    assert BridgeClient(idle.url).commands() == []


# -----------------------------------------------------------------------------
# the OpenAPI says what the server does


def test_errors_have_one_form_and_the_openapi_declares_them(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=4"], gates=[2]) as live:
        live.gate.wait(2)  # the optimizer exists
        base = live.run.url
        openapi = httpx.get(base + "/openapi.json").json()
        refused = send(base, {"type": "set_optimizer", "args": {"momentum": 0.9}})  # AdamW has none
        unknown = send(base, {"type": "launch_missiles"})
        not_json = httpx.post(
            base + "/api/commands", content=b"\xff", headers={"content-type": "application/json"}
        )
        options = httpx.options(base + "/api/commands")
        types = [t["type"] for t in live.client.command_types()]
        live.gate.release(2)
        live.join()
        finished = send(base, {"type": "pause"})

    for response in (refused, unknown):
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert isinstance(detail, list) and {"loc", "msg", "type"} <= set(detail[0]), detail
    assert "has no momentum" in refused.json()["detail"][0]["msg"]
    assert "unknown command type" in unknown.json()["detail"][0]["msg"]
    assert not_json.status_code == 400 and finished.status_code == 409
    assert options.status_code == 405 and options.headers["allow"] == "GET, POST"

    paths = openapi["paths"]
    post = paths["/api/commands"]["post"]
    assert {"200", "400", "409", "413", "422"} <= set(post["responses"])
    with_ids = [p for p in paths if "{" in p]
    assert len(with_ids) == 8 and all(
        "404" in operation["responses"] for p in with_ids for operation in paths[p].values()
    )
    # One body per command type, typed by the registry (what /api/command-types lists).
    schemas = openapi["components"]["schemas"]
    variants = [
        schemas[ref["$ref"].rsplit("/", 1)[1]]
        for ref in post["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    ]
    assert sorted(v["properties"]["type"]["const"] for v in variants) == sorted(types)
    # The run's optimizer is AdamW: the OpenAPI offers no momentum.
    assert "momentum" not in schemas["SetOptimizerArgs"]["properties"]
    for path in ("/api/metrics", "/api/commands", "/api/decisions", "/api/runs/{run_id}/metrics"):
        assert "Link" in paths[path]["get"]["responses"]["200"]["headers"], path


# -----------------------------------------------------------------------------
# pages


def follow(client: httpx.Client, url: str, params: dict) -> tuple[list, list[list]]:
    """Every row, following Link rel="next"; and the pages."""
    pages = [client.get(url, params=params)]
    while "link" in pages[-1].headers:
        next_url = pages[-1].headers["link"].split(">", 1)[0].lstrip("<")
        pages.append(client.get(next_url))
    assert all(page.status_code == 200 for page in pages)
    return [row for page in pages for row in page.json()], [page.json() for page in pages]


def test_metrics_commands_and_decisions_come_in_pages(tmp_path):
    with LiveRun(tmp_path, ["training.max_steps=30", "training.eval_steps=10"], gates=[5]) as live:
        live.gate.wait(5)
        for value in (0.5, 1.0, 2.0, 3.0, 4.0):
            live.client.set_max_grad_norm(value)
        live.gate.release(5)
        summary = live.join()
        base, run_id = live.run.url, summary["run_id"]
        client = httpx.Client(base_url=base)
        with Store(live.db) as store:
            for i in range(5):
                store.add_decision(
                    run_id, NewDecision(step=i, agent="llm", action="keep", explanation=f"decision {i}")
                )
            store.add_metrics(run_id, [{"step": 31, "name": "loss", "value": math.nan}])

        whole = client.get("/api/metrics")
        assert "link" not in whole.headers  # the last (and only) page
        whole = whole.json()
        assert 150 < len(whole) < METRICS_PAGE
        for url in ("/api/metrics", f"/api/runs/{run_id}/metrics"):
            rows, pages = follow(client, url, {"limit": 7})
            assert rows == whole, url
            steps = [{row["step"] for row in page} for page in pages]
            # At most 7 rows, but a step is never split: one with more (an evaluation's) comes alone.
            assert len(pages) > 10 and all(
                len(p) <= 7 or len(s) == 1 for p, s in zip(pages, steps, strict=True)
            )
            assert any(len(page) > 7 for page in pages)
            assert all(
                a.isdisjoint(b) for a, b in zip(steps, steps[1:], strict=False)
            )  # a step is never split
        assert client.get("/api/metrics", params={"limit": METRICS_PAGE + 1}).status_code == 422

        commands, pages = follow(client, "/api/commands", {"limit": 2})
        assert commands == client.get("/api/commands").json() and len(commands) == 5
        assert [len(page) for page in pages] == [2, 2, 1]
        assert follow(client, f"/api/runs/{run_id}/commands", {"limit": 2})[0] == commands
        for url in ("/api/decisions", f"/api/runs/{run_id}/decisions"):
            decisions, pages = follow(client, url, {"limit": 2})
            assert [d["explanation"] for d in decisions] == [f"decision {i}" for i in range(5)]
            assert [len(page) for page in pages] == [2, 2, 1]

        # Down-sampled for a chart: per series a few rows, its extremes, its NaN and its last row kept.
        loss = [r for r in whole if r["name"] == "loss"]
        thin = client.get("/api/metrics", params={"points": 3, "name": "loss"}).json()
        assert len(thin) <= 3 * 3 + 1 < len(loss)
        finite = [r["value"] for r in loss if r["value"] is not None]
        kept = {r["id"] for r in thin}
        assert {r["id"] for r in loss if r["value"] in (min(finite), max(finite))} <= kept
        assert loss[-1]["id"] in kept and loss[-1]["value"] is None  # the NaN at step 31, the last row
        # In pages, a down-sampled history keeps its ranges: every row of the one-page answer comes.
        paged, pages = follow(client, "/api/metrics", {"points": 3, "name": "loss", "limit": 2})
        assert len(pages) > 2 and kept <= {r["id"] for r in paged}
        client.close()


def test_the_clients_read_every_page(idle):
    """BridgeClient.metrics()/commands() and their async twins return whole lists, page after page, as
    before pages existed: a supervisor reading a long run's history must not get only its start."""
    from selfsteer.trainer_bridge.client import AsyncBridgeClient
    from selfsteer.trainer_bridge.pages import LIST_PAGE

    steps = METRICS_PAGE // 2 + 1  # two metrics a step: more rows than one page holds
    rows = [{"step": s, "name": n, "value": float(s)} for s in range(1, steps + 1) for n in ("loss", "lr")]
    idle.store.add_metrics(idle.run_id, rows)
    for _ in range(LIST_PAGE + 1):
        idle.store.add_command(idle.run_id, "pause", {}, "test")
    assert "link" in httpx.get(idle.url + "/api/metrics").headers  # more than one page

    with BridgeClient(idle.url) as client:
        metrics, commands = client.metrics(), client.commands()
        assert len(client.metrics(since=steps - 1, names=["loss"])) == 1

    async def read():
        async with AsyncBridgeClient(idle.url) as client:
            return await client.metrics(), await client.commands()

    import asyncio

    assert asyncio.run(read()) == (metrics, commands)
    assert [(r["step"], r["name"]) for r in metrics] == [(r["step"], r["name"]) for r in rows]
    assert len(commands) == LIST_PAGE + 1
