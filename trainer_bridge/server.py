"""The control server: FastAPI + uvicorn in a daemon thread of the training process.

    GET  /api/state                     where the run is (step, phase, branch, optimizer, last metrics)
    GET  /api/metrics?since=STEP        stored metrics after STEP (optionally &branch=, &name=, &points=)
    POST /api/commands                  {"type", "args", "source", "idempotency_key"} -> {uuid, status, step,
                                        repeated}; 422 (not a command of this run), 409 (the run is over)
    GET  /api/commands[/{uuid}]         the journal (404 for a uuid of no command of this run)
    GET  /api/command-types             what can be sent, with JSON schemas of the args
    GET  /api/checkpoints, /api/branches
    GET  /api/decisions?after_id=N      the supervisor's decisions on this run (written to the store)
    WS   /api/events                    JSON events: metrics (batched points), command changes, state
                                        changes, warnings (a NaN or infinite loss or gradient norm)
    GET  /api/info                      {mode: "live" | "history", run_id, version}
    GET  /api/runs[/{id}[/metrics|decisions|commands|branches|checkpoints]]   every run in the store
    GET  /                              the dashboard (React, built by scripts/install.sh)

The OpenAPI (/openapi.json, /docs) is the contract: every route declares its response model and its error
responses, and POST /api/commands takes one request body per registered command type (its `args` model),
so what fits the schema is accepted and what does not is refused with 422 (FastAPI's list of errors).

Lists that grow with a run come in pages: metrics, commands and decisions take `limit` (at most
METRICS_PAGE or LIST_PAGE, the default) and a cursor (`since` a step, `after` a command's uuid,
`after_id` a decision's id). A full page carries a `Link: <...>; rel="next"` header with the URL of the
next one; a page without it is the last. A metrics page never splits a step, so `since` = the page's last
step is where the next one starts; `points=N` down-samples metrics for charts (see Store.get_metrics).

The training thread never waits on a client: events are handed to the server's event loop with one
non-blocking call, and each subscriber has a bounded queue that drops its oldest events when the client
is slow. Binding anything but loopback requires a bearer token; CORS allows only the served origin.
A request body over MAX_BODY_BYTES is refused (413) before anyone reads it, and no error quotes more than
ECHO_CHARS characters of what a client sent.
The dashboard's own files (`/`, `/assets/*`) load without the token: they hold no data, and the page asks
for the token before it reads anything.

`create_history_app(store)` serves the store's runs without a live run (`selfsteer dashboard`).
The dashboard's folder is handed in by the caller (`static_dir`; `dashboard_dir()` finds the installed
one): this, the lowest layer, does not import the UI package. Binding, loopback and the token: `net`.
The pages and their query parameters: `pages`; the body of POST /api/commands: `command_bodies`; the
events' fan-out: `events`; the body limit and the error forms: `http_errors`.
"""

import asyncio
import contextlib
import copy
import json
import logging
import pathlib
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Annotated, Any, Literal

import uvicorn
from fastapi import (
    APIRouter,
    Body,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    Security,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from fastapi.security import APIKeyQuery, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfsteer.trainer_bridge.checkpoints import list_branches, list_checkpoints
from selfsteer.trainer_bridge.command_bodies import CommandBodies, fit_to_optimizer
from selfsteer.trainer_bridge.commands import InvalidCommand, NotFound, RunFinished, dump_args
from selfsteer.trainer_bridge.events import EVENT_QUEUE_SIZE, EventHub
from selfsteer.trainer_bridge.http_errors import (
    MAX_BODY_BYTES,
    MAX_DECISION_BYTES,
    BodyLimit,
    _clip,
    _error,
    _http_error,
    _validation_error,
)
from selfsteer.trainer_bridge.net import BearerAuth, LoopbackGuard, bind, is_loopback
from selfsteer.trainer_bridge.pages import (
    LIST_PAGE,
    METRICS_PAGE,
    NEXT_PAGE,
    After,
    AfterId,
    BranchName,
    Limit,
    MetricNames,
    MetricsLimit,
    Points,
    Since,
    Status,
    commands_page,
    decisions_page,
    metrics_page,
)
from selfsteer.trainer_bridge.records import (
    MAX_INT,
    Accepted,
    Branch,
    Checkpoint,
    Command,
    Decision,
    DecisionUpdate,
    MetricPoint,
    NewDecision,
    Record,
    Run,
    RunDetail,
    RunState,
)
from selfsteer.trainer_bridge.store import Store

if TYPE_CHECKING:
    from selfsteer.trainer_bridge.bridge import Bridge

log = logging.getLogger(__name__)


# -----------------------------------------------------------------------------
# the API's types: what every route answers (the error body: http_errors.ErrorDetail)


class Info(Record):
    mode: Literal["live", "history"]
    run_id: str | None
    version: str


class CommandType(Record):
    type: str
    description: str
    args_schema: dict[str, Any]


NOT_FOUND = {404: _error("No such run or command.")}


def _invalid(exc: InvalidCommand) -> RequestValidationError:
    """A command this run refuses (an optimizer without that setting, an idempotency key already used for
    another command), as a 422 of the same form as a body that does not fit the schema."""
    return RequestValidationError([{"type": "invalid_command", "loc": ("body",), "msg": str(exc)}])


# -----------------------------------------------------------------------------
# the app


def _version() -> str:
    try:
        return version("selfsteer")
    except PackageNotFoundError:
        return "unknown"


def dashboard_dir() -> pathlib.Path | None:
    """The folder the dashboard is built into (`index.html`, `assets/`): what a caller hands the server
    as `static_dir` to serve the dashboard at `/`. None when the dashboard package is not a folder on
    disk (StaticFiles serves a directory). The folder may not be built yet: the server then shows the
    page saying how to build it, and the built page on the next reload.

    Found as data, by package name (importlib.resources): the dashboard is a top-level package (the UI),
    which this layer never imports by an import statement. Its build, `dist/`, is there in an editable
    install (where `scripts/install.sh` built it); a wheel built without it has none."""
    try:
        root = resources.files("selfsteer.dashboard")
    except ModuleNotFoundError:
        return None
    return root / "dist" if isinstance(root, pathlib.Path) else None


def _base_app(
    title: str,
    origins: list[str],
    token: str | None,
    lifespan=None,
    static_dir: pathlib.Path | None = None,
) -> FastAPI:
    """What every selfsteer server has: CORS to its own origin, the token, a loopback server's Host and
    Origin checks (`net.LoopbackGuard`), the body limit, the error forms, the dashboard's files from
    `static_dir` (its `index.html` at `/`, its `assets/`; None, or a folder without `index.html`: a page
    saying how to build the dashboard)."""
    responses: dict = {}
    dependencies = []
    if token is not None:
        responses[401] = _error("Missing or wrong bearer token.")
        # Declared for the OpenAPI (either one will do); BearerAuth is what checks it.
        dependencies = [
            Security(HTTPBearer(auto_error=False, description="Authorization: Bearer TOKEN")),
            Security(APIKeyQuery(name="token", auto_error=False, description="?token=TOKEN (a WebSocket)")),
        ]
    app = FastAPI(
        title=title, version=_version(), lifespan=lifespan, responses=responses, dependencies=dependencies
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error(app))
    app.add_middleware(
        CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=["*"]
    )
    app.add_middleware(BearerAuth, token=token)
    app.add_middleware(BodyLimit)  # a large body is refused before anything reads it
    # Outermost: a request another site's page forged is refused before anything else looks at it.
    app.add_middleware(LoopbackGuard, origins=origins)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        index = static_dir / "index.html" if static_dir is not None else None
        # Read on every load: a dashboard built while the server runs shows on reload.
        return index.read_text(encoding="utf-8") if index is not None and index.is_file() else _NOT_BUILT_HTML

    if static_dir is not None and (static_dir / "assets").is_dir():
        app.mount("/assets", StaticFiles(directory=static_dir / "assets"), name="assets")
    return app


RunId = Annotated[str, Path(max_length=200)]


def store_router(get_store: Callable[[], Store]) -> APIRouter:
    """Read-only views of every run in the store: the dashboard's history.
    Heavy columns (a run's config, a decision's observation) only come with the one row they belong to.
    `get_store` because a live bridge opens its store when training starts, after the app is built."""
    router = APIRouter(prefix="/api/runs")

    def run_or_404(run_id: str) -> dict:
        store = get_store()
        run = store.get_run(run_id)
        if run is None:
            raise HTTPException(404, f"no run {_clip(repr(run_id))} in {store.path}")
        return run

    @router.get("")
    def list_runs(
        kind: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="The newest this many runs.")] = 100,
    ) -> list[Run]:
        return get_store().list_runs(kind, limit)  # `Run` has no config: it stays with the one run

    @router.get("/{run_id}", responses=NOT_FOUND)
    def get_run(run_id: RunId) -> RunDetail:
        return run_or_404(run_id)

    @router.get("/{run_id}/metrics", responses={**NOT_FOUND, **NEXT_PAGE})
    def get_run_metrics(
        run_id: RunId,
        request: Request,
        response: Response,
        since: Since = None,
        branch: BranchName = None,
        name: MetricNames = None,
        limit: MetricsLimit = METRICS_PAGE,
        points: Points = None,
    ) -> list[MetricPoint]:
        run_or_404(run_id)
        return metrics_page(get_store(), run_id, request, response, since, branch, name, limit, points)

    @router.get("/{run_id}/decisions", responses={**NOT_FOUND, **NEXT_PAGE})
    def get_run_decisions(
        run_id: RunId, request: Request, response: Response, after_id: AfterId = 0, limit: Limit = LIST_PAGE
    ) -> list[Decision]:
        run_or_404(run_id)
        return decisions_page(get_store(), run_id, request, response, after_id, limit)

    @router.get("/{run_id}/commands", responses={**NOT_FOUND, **NEXT_PAGE})
    def get_run_commands(
        run_id: RunId,
        request: Request,
        response: Response,
        status: Status = None,
        after: After = None,
        limit: Limit = LIST_PAGE,
    ) -> list[Command]:
        run_or_404(run_id)
        return commands_page(get_store(), run_id, request, response, status, after, limit)

    @router.get("/{run_id}/branches", responses=NOT_FOUND)
    def get_run_branches(run_id: RunId) -> list[Branch]:
        run_or_404(run_id)
        return list_branches(get_store(), run_id)

    @router.get("/{run_id}/checkpoints", responses=NOT_FOUND)
    def get_run_checkpoints(run_id: RunId) -> list[Checkpoint]:
        run_or_404(run_id)
        return list_checkpoints(get_store(), run_id)

    return router


def create_history_app(
    store: Store, origins: list[str], token: str | None, static_dir: pathlib.Path | None = None
) -> FastAPI:
    """The dashboard over a store with no live run: past runs, their metrics, decisions and journals.
    `static_dir`: the built dashboard (see `dashboard_dir`); None serves the page saying how to build it."""
    app = _base_app("selfsteer history", origins, token, static_dir=static_dir)

    @app.get("/api/info")
    def get_info() -> Info:
        return Info(mode="history", run_id=None, version=_version())

    app.include_router(store_router(lambda: store))
    return app


def add_decision_routes(app: FastAPI, bridge: "Bridge") -> None:
    """A live run's decisions. Every writer of a run goes through its server: a supervisor attached by
    URL records its decisions here, in the run's own store, and needs nothing else."""

    @app.get("/api/decisions", responses=NEXT_PAGE)
    def get_decisions(
        request: Request,
        response: Response,
        after_id: AfterId = 0,
        limit: Limit = LIST_PAGE,
        key: Annotated[
            str | None, Query(max_length=400, description="Only the decision under this key.")
        ] = None,
    ) -> list[Decision]:
        if key is not None:
            return bridge.decisions(key=key, after_id=after_id)
        return decisions_page(bridge.store, bridge.run_id, request, response, after_id, limit)

    @app.post(
        "/api/decisions",
        responses={
            400: _error("The body is not JSON."),
            404: _error("`retry_of` names no decision of this run."),
            413: _error(f"The body is over {MAX_DECISION_BYTES} bytes."),
        },
    )
    def post_decision(decision: NewDecision) -> Decision:
        """Record a decision of this run. A repeat under a `key` the run has seen returns the first."""
        try:
            return bridge.record_decision(decision)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.patch("/api/decisions/{decision_id}", responses={**NOT_FOUND, 400: _error("The body is not JSON.")})
    def patch_decision(
        decision_id: Annotated[int, Path(ge=1, le=MAX_INT)], update: DecisionUpdate
    ) -> Decision:
        """What followed a decision: its outcome; under self-correction, the reflection on it and whether
        the run was rolled back to before it."""
        try:
            return bridge.update_decision(decision_id, update)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/reflections")
    def get_reflections(
        agent: Annotated[str | None, Query(max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=LIST_PAGE)] = 5,
    ) -> list[Decision]:
        """The latest decisions judged failures, with their reflections, newest first, of every run in
        this run's store (optionally of one agent): a supervisor's memory across runs."""
        return bridge.store.list_reflections(agent=agent, limit=limit)


def add_command_routes(app: FastAPI, bridge: "Bridge", bodies: CommandBodies) -> None:
    """A live run's commands: sent, listed, looked up, and the types it takes."""

    @app.post(
        "/api/commands",
        responses={
            400: _error("The body is not JSON."),
            409: _error("The run is over: nothing more is applied."),
            413: _error(f"The body is over {MAX_BODY_BYTES} bytes."),
        },
    )
    def post_command(
        body: Annotated[Any, Body(description="One of the command types: see the schema.")],
    ) -> Accepted:
        command = bodies.validate(body)
        try:
            return bridge.submit(
                command.type, dump_args(command.args), command.source, command.idempotency_key
            )
        except InvalidCommand as exc:
            raise _invalid(exc) from None
        except RunFinished as exc:
            raise HTTPException(409, str(exc)) from None

    @app.get("/api/commands", responses=NEXT_PAGE)
    def get_commands(
        request: Request,
        response: Response,
        status: Status = None,
        after: After = None,
        limit: Limit = LIST_PAGE,
    ) -> list[Command]:
        return commands_page(bridge.store, bridge.run_id, request, response, status, after, limit)

    @app.get("/api/commands/{uuid}", responses=NOT_FOUND)
    def get_command(uuid: Annotated[str, Path(max_length=200)]) -> Command:
        try:
            return bridge.command(uuid)
        except NotFound:
            raise HTTPException(404, f"no command {_clip(repr(uuid))} in run {bridge.run_id}") from None

    @app.get("/api/command-types")
    def get_command_types() -> list[CommandType]:
        return bridge.registry.describe()


def add_event_route(app: FastAPI, bridge: "Bridge", hub: EventHub, origins: list[str]) -> None:
    """`/api/events`: the run's state, then every change (metric points, commands, decisions) as it comes."""

    @app.websocket("/api/events")
    async def events(websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if origin is not None and origin not in origins:
            await websocket.close(code=1008)  # a page from another site must not read the run
            return
        await websocket.accept()
        try:
            first = json.dumps({"event": "state", "state": bridge.state()}, default=str)
        except Exception:
            # The server's own fault, not the client's leaving: said as such, and the client told (1011).
            log.exception("WS /api/events: cannot read the run's state for a new subscriber")
            with contextlib.suppress(RuntimeError, OSError):
                await websocket.close(code=1011)
            return
        queue: asyncio.Queue = asyncio.Queue(maxsize=EVENT_QUEUE_SIZE)
        hub.subscribers.add(queue)
        try:
            await websocket.send_text(first)
            sender = asyncio.ensure_future(_send_loop(websocket, queue))
            receiver = asyncio.ensure_future(_drain(websocket))
            done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # a dropped client is its own business
        finally:
            hub.subscribers.discard(queue)


def create_app(
    bridge: "Bridge",
    hub: EventHub,
    origins: list[str],
    token: str | None,
    static_dir: pathlib.Path | None = None,
) -> FastAPI:
    """A live run's control server: its state, metrics, checkpoints and branches here; its decisions,
    commands and events from the functions above (routes on the app itself: Starlette's 405 names the
    methods of every route on a path, see `http_errors._http_error`, and cannot see into an included router); every run of its store (`store_router`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        yield
        hub.loop = None

    app = _base_app("selfsteer control server", origins, token, lifespan, static_dir)
    bodies = CommandBodies(lambda: bridge.registry)

    # The handlers are plain `def`: FastAPI runs them in its thread pool, so SQLite reads never block
    # the event loop (and the WebSocket fan-out with it).

    @app.get("/api/info")
    def get_info() -> Info:
        return Info(mode="live", run_id=bridge.run_id, version=_version())

    add_decision_routes(app, bridge)

    @app.get("/api/state", response_model_exclude_unset=True)
    def get_state() -> RunState:
        return bridge.state()

    @app.get("/api/metrics", responses=NEXT_PAGE)
    def get_metrics(
        request: Request,
        response: Response,
        since: Since = None,
        branch: BranchName = None,
        name: MetricNames = None,
        limit: MetricsLimit = METRICS_PAGE,
        points: Points = None,
    ) -> list[MetricPoint]:
        return metrics_page(
            bridge.store, bridge.run_id, request, response, since, branch, name, limit, points
        )

    add_command_routes(app, bridge, bodies)

    @app.get("/api/checkpoints")
    def get_checkpoints() -> list[Checkpoint]:
        return bridge.list_checkpoints()

    @app.get("/api/branches")
    def get_branches() -> list[Branch]:
        return bridge.list_branches()

    app.include_router(store_router(lambda: bridge.store))
    add_event_route(app, bridge, hub, origins)
    routes_openapi = app.openapi  # FastAPI's, built once from the routes and cached

    def openapi() -> dict:
        document = copy.deepcopy(routes_openapi())
        bodies.document(document)
        fit_to_optimizer(document, bridge.state().get("optimizer"))
        return document

    app.openapi = openapi  # type: ignore[method-assign]
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


class ControlServer:
    def __init__(
        self,
        bridge: "Bridge",
        host: str = "127.0.0.1",
        port: int = 7007,
        token: str | None = None,
        event_interval_s: float = 0.5,
        static_dir: pathlib.Path | None = None,
    ):
        """`static_dir`: the built dashboard to serve at `/` (`dashboard_dir()` finds the one installed);
        None serves a page saying how to build it."""
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
        app = create_app(bridge, self.hub, origins, token, static_dir)
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
