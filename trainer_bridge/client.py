"""Clients of the control server, over httpx (REST) and websockets (events): `BridgeClient` for plain code,
`AsyncBridgeClient` for asyncio. Both mirror the API one method per route, plus a helper per command.

    client = BridgeClient("http://127.0.0.1:7007", source="my-agent")
    uuid = client.set_lr(2e-3)["uuid"]
    client.wait(uuid)          # -> the journal row, status success or failed
    for event in client.events():
        ...

Errors come back as `BridgeHTTPError` with the status code and the server's reason (422: bad command,
409: the run is over, 404: unknown command).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from websockets.asyncio.client import connect as connect_async
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as connect_sync

from selfsteer.trainer_bridge.records import Decision, DecisionUpdate, NewDecision

DEFAULT_URL = "http://127.0.0.1:7007"
DONE = ("success", "failed")


class CommandTimeout(TimeoutError):
    """A command the run did not finish applying in time (it is held, or busy in a long command): the
    run's delay, not a model's."""


class BridgeHTTPError(RuntimeError):
    def __init__(self, status_code: int, detail: Any):
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


def _raise_for(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    raise BridgeHTTPError(response.status_code, detail)


def _next_page(response: httpx.Response) -> str | None:
    """Lists that grow come in pages: a full one names the next in `Link: <URL>; rel="next"`."""
    return response.links.get("next", {}).get("url")


def _ws_url(url: str) -> str:
    return "ws" + url.removeprefix("http") + "/api/events"  # http -> ws, https -> wss


def _drop_none(args: dict) -> dict:
    return {k: v for k, v in args.items() if v is not None}


class _Commands:
    """The typed helpers, shared by both clients: each is `send(type, **args)`. Each takes an optional
    `idempotency_key`: a repeat under a key the run has seen returns the first command, queues nothing."""

    source: str

    def send(self, type: str, *, idempotency_key: str | None = None, **args: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _body(self, type: str, args: dict, idempotency_key: str | None) -> dict:
        body = {"type": type, "args": args, "source": self.source}
        return body if idempotency_key is None else {**body, "idempotency_key": idempotency_key}

    def set_optimizer(
        self,
        lr=None,
        weight_decay=None,
        betas=None,
        eps=None,
        momentum=None,
        idempotency_key=None,
        schedule=None,
    ):
        betas = list(betas) if betas is not None else None
        args = dict(
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, schedule=schedule
        )
        return self.send("set_optimizer", idempotency_key=idempotency_key, **_drop_none(args))

    def set_lr(self, lr: float, idempotency_key: str | None = None, schedule: str | None = None):
        """schedule: "scale" (the server's default when None: the rest of the LR schedule is scaled to pass
        through lr) or "constant" (the lr holds at lr from the next step on)."""
        return self.send(
            "set_optimizer", idempotency_key=idempotency_key, **_drop_none({"lr": lr, "schedule": schedule})
        )

    def set_max_grad_norm(self, value: float, idempotency_key: str | None = None):
        return self.send("set_max_grad_norm", idempotency_key=idempotency_key, value=value)

    def pause(self, idempotency_key: str | None = None):
        return self.send("pause", idempotency_key=idempotency_key)

    def resume(self, idempotency_key: str | None = None):
        return self.send("resume", idempotency_key=idempotency_key)

    def stop(self, idempotency_key: str | None = None):
        return self.send("stop", idempotency_key=idempotency_key)

    def save_checkpoint(
        self, name: str | None = None, idempotency_key: str | None = None, memory: bool = False
    ):
        args = _drop_none({"name": name}) | ({"memory": True} if memory else {})
        return self.send("save_checkpoint", idempotency_key=idempotency_key, **args)

    def load_checkpoint(self, checkpoint: str, branch: str | None = None, idempotency_key: str | None = None):
        args = _drop_none({"checkpoint": checkpoint, "branch": branch})
        return self.send("load_checkpoint", idempotency_key=idempotency_key, **args)

    def evaluate(self, idempotency_key: str | None = None):
        return self.send("evaluate", idempotency_key=idempotency_key)

    def probe(
        self,
        factors: list[float] | None = None,
        steps: int | None = None,
        horizon: int | None = None,
        idempotency_key: str | None = None,
        restart: list[float] | None = None,
    ):
        args = _drop_none(
            {"factors": factors, "steps": steps, "horizon": horizon, "restart": restart or None}
        )
        return self.send("probe", idempotency_key=idempotency_key, **args)

    def reload_data(self, dataset: str | None = None, idempotency_key: str | None = None):
        return self.send("reload_data", idempotency_key=idempotency_key, **_drop_none({"dataset": dataset}))


class BridgeClient(_Commands):
    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, source: str = "api", timeout: float = 10.0
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.source = source
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- the routes

    def state(self) -> dict:
        return _raise_for(self.http.get("/api/state"))

    def _every_page(self, path: str, params: dict) -> list:
        response = self.http.get(path, params=params)
        rows = _raise_for(response)
        while url := _next_page(response):
            response = self.http.get(url)
            rows += _raise_for(response)
        return rows

    def metrics(self, since: int | None = None, branch: str | None = None, names: list[str] | None = None):
        """Every metric row after step `since` (all of them: page after page)."""
        return self._every_page("/api/metrics", _drop_none({"since": since, "branch": branch, "name": names}))

    def send(self, type: str, *, idempotency_key: str | None = None, **args: Any) -> dict:
        """Queues a command; returns {uuid, status, step, repeated} (step: where the run was when it
        arrived; repeated: the key was seen before and this is the first command under it)."""
        return _raise_for(self.http.post("/api/commands", json=self._body(type, args, idempotency_key)))

    def commands(self, status: str | None = None) -> list[dict]:
        return self._every_page("/api/commands", _drop_none({"status": status}))

    def command(self, uuid: str) -> dict:
        return _raise_for(self.http.get(f"/api/commands/{uuid}"))

    def command_types(self) -> list[dict]:
        return _raise_for(self.http.get("/api/command-types"))

    def checkpoints(self) -> list[dict]:
        return _raise_for(self.http.get("/api/checkpoints"))

    def branches(self) -> list[dict]:
        return _raise_for(self.http.get("/api/branches"))

    def decisions(self, key: str | None = None) -> list[Decision]:
        """The run's decisions (or the one under `key`), in the order they were made."""
        rows = self._every_page("/api/decisions", _drop_none({"key": key}))
        return [Decision.model_validate(row) for row in rows]

    def record_decision(self, decision: NewDecision) -> Decision:
        """Records a decision in the run's store; a repeat under a key the run has seen returns the first."""
        body = decision.model_dump(mode="json")
        return Decision.model_validate(_raise_for(self.http.post("/api/decisions", json=body)))

    def update_decision(self, decision_id: int, update: DecisionUpdate) -> Decision:
        body = update.model_dump(mode="json", exclude_none=True)
        return Decision.model_validate(
            _raise_for(self.http.patch(f"/api/decisions/{decision_id}", json=body))
        )

    def reflections(self, agent: str | None = None, limit: int = 5) -> list[Decision]:
        """The latest decisions judged failures, newest first, of every run in the run's store."""
        rows = _raise_for(
            self.http.get("/api/reflections", params=_drop_none({"agent": agent, "limit": limit}))
        )
        return [Decision.model_validate(row) for row in rows]

    def wait(self, uuid: str, timeout: float = 60.0, poll_s: float = 0.05) -> dict:
        """Polls until the command succeeded or failed; returns its journal row."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.command(uuid)
            if row["status"] in DONE:
                return row
            if time.monotonic() > deadline:
                raise CommandTimeout(f"command {uuid} still {row['status']} after {timeout} s")
            time.sleep(poll_s)

    def watch(self) -> int:
        """A token for `wait_for_change` (over HTTP there is no change notice: the wait is a pause)."""
        return 0

    def wait_for_change(self, token: int, timeout: float, poll_s: float = 0.2) -> bool:
        """Waits a polling interval (at most `timeout`) before the caller looks again; False."""
        time.sleep(max(0.0, min(timeout, poll_s)))
        return False

    def events(self, open_timeout: float = 10.0) -> Iterator[dict]:
        """Yields the server's events until the connection closes (first: the current state)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        with connect_sync(_ws_url(self.url), additional_headers=headers, open_timeout=open_timeout) as ws:
            try:
                for message in ws:
                    yield json.loads(message)
            except ConnectionClosed:
                return


class AsyncBridgeClient(_Commands):
    def __init__(
        self, url: str = DEFAULT_URL, token: str | None = None, source: str = "api", timeout: float = 10.0
    ):
        self.url = url.rstrip("/")
        self.token = token
        self.source = source
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncBridgeClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def state(self) -> dict:
        return _raise_for(await self.http.get("/api/state"))

    async def _every_page(self, path: str, params: dict) -> list:
        response = await self.http.get(path, params=params)
        rows = _raise_for(response)
        while url := _next_page(response):
            response = await self.http.get(url)
            rows += _raise_for(response)
        return rows

    async def metrics(
        self, since: int | None = None, branch: str | None = None, names: list[str] | None = None
    ):
        params = _drop_none({"since": since, "branch": branch, "name": names})
        return await self._every_page("/api/metrics", params)

    async def send(self, type: str, *, idempotency_key: str | None = None, **args: Any) -> dict:
        return _raise_for(await self.http.post("/api/commands", json=self._body(type, args, idempotency_key)))

    async def commands(self, status: str | None = None) -> list[dict]:
        return await self._every_page("/api/commands", _drop_none({"status": status}))

    async def command(self, uuid: str) -> dict:
        return _raise_for(await self.http.get(f"/api/commands/{uuid}"))

    async def command_types(self) -> list[dict]:
        return _raise_for(await self.http.get("/api/command-types"))

    async def checkpoints(self) -> list[dict]:
        return _raise_for(await self.http.get("/api/checkpoints"))

    async def branches(self) -> list[dict]:
        return _raise_for(await self.http.get("/api/branches"))

    async def decisions(self, key: str | None = None) -> list[Decision]:
        rows = await self._every_page("/api/decisions", _drop_none({"key": key}))
        return [Decision.model_validate(row) for row in rows]

    async def record_decision(self, decision: NewDecision) -> Decision:
        response = await self.http.post("/api/decisions", json=decision.model_dump(mode="json"))
        return Decision.model_validate(_raise_for(response))

    async def update_decision(self, decision_id: int, update: DecisionUpdate) -> Decision:
        body = update.model_dump(mode="json", exclude_none=True)
        return Decision.model_validate(
            _raise_for(await self.http.patch(f"/api/decisions/{decision_id}", json=body))
        )

    async def reflections(self, agent: str | None = None, limit: int = 5) -> list[Decision]:
        params = _drop_none({"agent": agent, "limit": limit})
        return [
            Decision.model_validate(row)
            for row in _raise_for(await self.http.get("/api/reflections", params=params))
        ]

    async def wait(self, uuid: str, timeout: float = 60.0, poll_s: float = 0.05) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = await self.command(uuid)
            if row["status"] in DONE:
                return row
            if time.monotonic() > deadline:
                raise CommandTimeout(f"command {uuid} still {row['status']} after {timeout} s")
            await asyncio.sleep(poll_s)

    async def events(self, open_timeout: float = 10.0) -> AsyncIterator[dict]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        url = _ws_url(self.url)
        async with connect_async(url, additional_headers=headers, open_timeout=open_timeout) as ws:
            try:
                async for message in ws:
                    yield json.loads(message)
            except ConnectionClosed:
                return
