"""The control server: FastAPI + uvicorn in a daemon thread of the training process.

    GET  /api/state                     where the run is (step, phase, branch, optimizer, last metrics)
    GET  /api/metrics?since=STEP        stored metrics after STEP (optionally &branch=, &name=)
    POST /api/commands                  {"type", "args", "source"} -> {uuid, status, step}; 422/409
    GET  /api/commands[/{uuid}]         the journal (404 for a uuid of no command of this run)
    GET  /api/command-types             what can be sent, with JSON schemas of the args
    GET  /api/checkpoints, /api/branches
    GET  /api/decisions?after_id=N      the supervisor's decisions on this run (written to the store)
    WS   /api/events                    JSON events: metrics (batched points), command changes, state changes
    GET  /api/info                      {mode: "live" | "history", run_id, version}
    GET  /api/runs[/{id}[/metrics|decisions|commands|branches|checkpoints]]   every run in the store
    GET  /                              the dashboard (React, built by scripts/install.sh)

The training thread never waits on a client: events are handed to the server's event loop with one
non-blocking call, and each subscriber has a bounded queue that drops its oldest events when the client
is slow. Binding anything but loopback requires a bearer token; CORS allows only the served origin.
The dashboard's own files (`/`, `/assets/*`) load without the token: they hold no data, and the page asks
for the token before it reads anything.

`create_history_app(store)` serves the store's runs without a live run (`selfsteer dashboard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

import uvicorn
from fastapi import APIRouter, FastAPI, HTTPException, Query, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from selfsteer import dashboard
from selfsteer.trainer_bridge.commands import InvalidCommand
from selfsteer.trainer_bridge.store import Store, json_number

if TYPE_CHECKING:
    from selfsteer.trainer_bridge.bridge import Bridge

EVENT_QUEUE_SIZE = 1000
LISTEN_BACKLOG = 2048  # uvicorn's own default


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    args: dict[str, Any] = Field(default_factory=dict)
    # Who sends it: "human", an agent's name, "api" (the default), ...
    source: Annotated[str, Field(strict=True, min_length=1, max_length=64)] = "api"
    # A repeat under a key this run has seen returns the first command instead of queueing another.
    idempotency_key: Annotated[str, Field(strict=True, min_length=1, max_length=200)] | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# events


class EventHub:
    """Fan-out from the training thread to WebSocket subscribers on the server's loop.

    Metrics come every step; sending each as its own frame to every subscriber would cost the training
    process (and the subscribers) CPU per step. So metric points are batched: one
    `{"event": "metrics", "points": [...]}` frame per `interval_s` at most. Command and state events go
    out at once, after any metrics still waiting, so subscribers see everything in order."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subscribers: set[asyncio.Queue] = set()
        self._points: list[dict] = []
        self._lock = threading.Lock()  # guards _points and _flush_scheduled across the two threads
        self._flush_scheduled = False

    def publish_point(self, point: dict) -> None:
        """A metrics point {step, branch, values}; sent with others within interval_s."""
        loop = self.loop
        if loop is None or not self.subscribers:
            return
        with self._lock:
            self._points.append(point)
            schedule, self._flush_scheduled = not self._flush_scheduled, True
        if schedule:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to tell
                loop.call_soon_threadsafe(loop.call_later, self.interval_s, self._flush)

    def publish(self, event: dict) -> None:
        loop = self.loop
        if loop is None or not self.subscribers:
            return
        text = json.dumps(event, default=str)  # encoded once, here, for every subscriber
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._send_after_points, text)

    def _send_after_points(self, text: str) -> None:
        self._flush()
        self._fan_out(text)

    def _flush(self) -> None:
        with self._lock:
            points, self._points, self._flush_scheduled = self._points, [], False
        if points:
            self._fan_out(json.dumps({"event": "metrics", "points": points}, default=str))

    def _fan_out(self, text: str) -> None:
        for queue in list(self.subscribers):
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()  # a slow client loses its oldest event, never blocks anyone
            queue.put_nowait(text)


# -----------------------------------------------------------------------------
# auth: a plain ASGI middleware, so it covers HTTP and WebSocket alike


def is_public(path: str) -> bool:
    """The dashboard's static files: no run data in them, and a browser loads them without headers."""
    return path == "/" or path.startswith("/assets/")


class BearerAuth:
    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and is_public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
        if not given:
            # Browsers cannot set headers on a WebSocket or a page load: accept ?token= too.
            query = dict(
                part.split("=", 1)
                for part in scope.get("query_string", b"").decode().split("&")
                if "=" in part
            )
            given = query.get("token", "")
        if hmac.compare_digest(given.encode(), self.token.encode()):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        await response(scope, receive, send)


# -----------------------------------------------------------------------------
# the app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("selfsteer")
    except PackageNotFoundError:
        return "unknown"


def _base_app(title: str, origins: list[str], token: str | None, lifespan=None) -> FastAPI:
    """What every selfsteer server has: CORS to its own origin, the token, the dashboard's files."""
    app = FastAPI(title=title, lifespan=lifespan)
    app.add_middleware(
        CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"]
    )
    app.add_middleware(BearerAuth, token=token)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return dashboard.index_html() or _NOT_BUILT_HTML

    if (dashboard.DIST_DIR / "assets").is_dir():
        app.mount("/assets", StaticFiles(directory=dashboard.DIST_DIR / "assets"), name="assets")
    return app


def store_router(get_store: Callable[[], Store]) -> APIRouter:
    """Read-only views of every run in the store: the dashboard's history.
    Heavy columns (a run's config, a decision's observation) only come with the one row they belong to.
    `get_store` because a live bridge opens its store when training starts, after the app is built."""
    router = APIRouter(prefix="/api/runs")

    def run_or_404(run_id: str) -> dict:
        store = get_store()
        run = store.get_run(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id!r} in {store.path}")
        return run

    @router.get("")
    def list_runs(kind: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
        runs = get_store().list_runs(kind, limit)
        return [{k: v for k, v in run.items() if k != "config"} for run in runs]

    @router.get("/{run_id}")
    def get_run(run_id: str) -> dict:
        return run_or_404(run_id)

    @router.get("/{run_id}/metrics")
    def get_run_metrics(
        run_id: str,
        since: Annotated[int | None, Query(ge=-1)] = None,
        branch: str | None = None,
        name: Annotated[list[str] | None, Query()] = None,
    ) -> list[dict]:
        run_or_404(run_id)
        rows = get_store().get_metrics(run_id, since_step=since, branch=branch, names=name)
        for row in rows:
            row["value"] = json_number(row["value"])
        return rows

    @router.get("/{run_id}/decisions")
    def get_run_decisions(run_id: str, after_id: Annotated[int, Query(ge=0)] = 0) -> list[dict]:
        run_or_404(run_id)
        return list_decisions(get_store(), run_id, after_id)

    @router.get("/{run_id}/commands")
    def get_run_commands(run_id: str) -> list[dict]:
        run_or_404(run_id)
        return get_store().list_commands(run_id)

    @router.get("/{run_id}/branches")
    def get_run_branches(run_id: str) -> list[dict]:
        from selfsteer.trainer_bridge.checkpoints import list_branches

        run_or_404(run_id)
        return list_branches(get_store(), run_id)

    @router.get("/{run_id}/checkpoints")
    def get_run_checkpoints(run_id: str) -> list[dict]:
        from selfsteer.trainer_bridge.checkpoints import list_checkpoints

        run_or_404(run_id)
        return list_checkpoints(get_store(), run_id)

    return router


def list_decisions(store: Store, run_id: str, after_id: int = 0) -> list[dict]:
    # The observation (the whole metric history the supervisor saw) stays in the store: it is large,
    # and `selfsteer decisions export` is the way to it.
    return [
        {k: v for k, v in row.items() if k != "observation"}
        for row in store.list_decisions(run_id)
        if row["id"] > after_id
    ]


def create_history_app(store: Store, origins: list[str], token: str | None) -> FastAPI:
    """The dashboard over a store with no live run: past runs, their metrics, decisions and journals."""
    app = _base_app("selfsteer history", origins, token)

    @app.get("/api/info")
    def get_info() -> dict:
        return {"mode": "history", "run_id": None, "version": _version()}

    app.include_router(store_router(lambda: store))
    return app


def create_app(bridge: Bridge, hub: EventHub, origins: list[str], token: str | None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        yield
        hub.loop = None

    app = _base_app("selfsteer control server", origins, token, lifespan)

    # The handlers are plain `def`: FastAPI runs them in its thread pool, so SQLite reads never block
    # the event loop (and the WebSocket fan-out with it).

    @app.get("/api/info")
    def get_info() -> dict:
        return {"mode": "live", "run_id": bridge.run_id, "version": _version()}

    @app.get("/api/decisions")
    def get_decisions(after_id: Annotated[int, Query(ge=0)] = 0) -> list[dict]:
        return list_decisions(bridge.store, bridge.run_id, after_id)

    @app.get("/api/state")
    def get_state() -> dict:
        return bridge.state()

    @app.get("/api/metrics")
    def get_metrics(
        since: Annotated[int | None, Query(ge=-1)] = None,
        branch: str | None = None,
        name: Annotated[list[str] | None, Query()] = None,
    ) -> list[dict]:
        return bridge.metrics(since=since, branch=branch, names=name)

    @app.post("/api/commands")
    def post_command(request: CommandRequest) -> dict:
        from selfsteer.trainer_bridge.bridge import RunFinished

        try:
            return bridge.submit(request.type, request.args, request.source, request.idempotency_key)
        except InvalidCommand as exc:
            raise HTTPException(422, str(exc)) from None
        except RunFinished as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/commands")
    def get_commands(status: str | None = None) -> list[dict]:
        return bridge.commands(status=status)

    @app.get("/api/commands/{uuid}")
    def get_command(uuid: str) -> dict:
        try:
            return bridge.command(uuid)
        except KeyError:
            raise HTTPException(404, f"no command {uuid!r} in run {bridge.run_id}") from None

    @app.get("/api/command-types")
    def get_command_types() -> list[dict]:
        return bridge.registry.describe()

    @app.get("/api/checkpoints")
    def get_checkpoints() -> list[dict]:
        return bridge.list_checkpoints()

    @app.get("/api/branches")
    def get_branches() -> list[dict]:
        return bridge.list_branches()

    app.include_router(store_router(lambda: bridge.store))

    @app.websocket("/api/events")
    async def events(websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if origin is not None and origin not in origins:
            await websocket.close(code=1008)  # a page from another site must not read the run
            return
        await websocket.accept()
        queue: asyncio.Queue = asyncio.Queue(maxsize=EVENT_QUEUE_SIZE)
        hub.subscribers.add(queue)
        try:
            await websocket.send_text(json.dumps({"event": "state", "state": bridge.state()}, default=str))
            sender = asyncio.ensure_future(_send_loop(websocket, queue))
            receiver = asyncio.ensure_future(_drain(websocket))
            done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # a dropped client is its own business
        finally:
            hub.subscribers.discard(queue)

    return app


async def _send_loop(websocket: WebSocket, queue: asyncio.Queue) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            await websocket.send_text(await queue.get())


async def _drain(websocket: WebSocket) -> None:
    # Clients send nothing we act on; reading is how a disconnect is noticed.
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


# -----------------------------------------------------------------------------
# running it in a thread


def bind(host: str, port: int) -> tuple[socket.socket, str, list[str]]:
    """A listening socket (port 0: any free one), the URL it serves and the origins CORS allows.

    It listens before it returns: the kernel queues connections from then on, so a client that
    connects the instant the URL is printed waits for the server instead of being refused (uvicorn
    itself calls listen() only after its start-up, some 200 ms later)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve on {host}:{port}: {exc}") from exc
    port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    origins = [url]
    if is_loopback(host):
        origins += [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
    return sock, url, sorted(set(origins))


class ControlServer:
    def __init__(
        self,
        bridge: Bridge,
        host: str = "127.0.0.1",
        port: int = 7007,
        token: str | None = None,
        event_interval_s: float = 0.5,
    ):
        if not is_loopback(host) and not token:
            raise ValueError(
                f"serving on {host} (not loopback) needs a bearer token: pass token= or set SELFSTEER_TOKEN"
            )
        self.bridge = bridge
        self.host = host
        self.token = token
        self.hub = EventHub(event_interval_s)
        # Bind here, in the caller's thread: a taken port fails now, loudly, and port 0 gets a real one.
        self.socket, self.url, origins = bind(host, port)
        self.port = self.socket.getsockname()[1]
        app = create_app(bridge, self.hub, origins, token)
        config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="selfsteer-server", daemon=True
        )
        self.thread.start()
        for _ in range(int(timeout / 0.01)):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self.server.started:
            raise RuntimeError(f"the control server did not start on {self.url}")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()


_NOT_BUILT_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>selfsteer</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}code{background:#f4f4f4;padding:0 .3em}</style>
</head><body>
<h1>selfsteer</h1>
<p>The dashboard is not built. Build it with <code>bash scripts/install.sh</code> (it needs Node.js 20+ and
npm), or by hand: <code>cd dashboard &amp;&amp; npm ci &amp;&amp; npm run build</code>, then reload.</p>
<p>The API works without it: <a href="/api/info">info</a>, <a href="/api/state">state</a>,
<a href="/api/metrics">metrics</a>, <a href="/api/commands">commands</a>, <a href="/api/runs">runs</a>,
<a href="/docs">OpenAPI docs</a>; live events on the WebSocket <code>/api/events</code>.</p>
</body></html>
"""
