"""What every selfsteer server does with the network, in one place: take a port (listening before the
URL is announced), tell a loopback address from a reachable one, check a bearer token, and refuse what
another site's page sends a loopback server (`LoopbackGuard`).

The control server (`trainer_bridge.server`), `selfsteer dashboard` and `selfsteer serve-llm`
(`agents.llm.openai_server`) all use these. Standard library only at import (starlette is imported when a
request is refused), so a command line can check its flags without loading a web framework.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlparse

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

LISTEN_BACKLOG = 2048  # uvicorn's own default
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # as a browser writes them in Host and Origin
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is this machine only:
    `localhost` or a loopback address. Any other name may resolve to anything: not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """Whether a URL's host is loopback (see `is_loopback`)."""
    return is_loopback(urlparse(url).hostname or "")


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
        origins += [f"http://{name}:{port}" for name in LOOPBACK_NAMES]
    return sock, url, sorted(set(origins))


# -----------------------------------------------------------------------------
# bearer tokens


def token_matches(given: str, token: str) -> bool:
    """Whether a client's token is the server's, compared in constant time: the time taken must not
    tell how much of a guess was right."""
    return hmac.compare_digest(given.encode(), token.encode())


def token_of(scope: Scope) -> str:
    """The bearer token a request carries: `Authorization: Bearer T`, else `?token=T` (percent-decoded)."""
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
    if given:
        return given
    # Browsers cannot set headers on a WebSocket or a page load: accept ?token= too.
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return next((value for key, value in query if key == "token"), "")


def is_public(path: str) -> bool:
    """The dashboard's static files: no run data in them, and a browser loads them without headers."""
    return path == "/" or path.startswith("/assets/")


class BearerAuth:
    """ASGI middleware: with a token, every HTTP request and WebSocket must carry it (`token_of`), except
    the public paths (`is_public`). A refused request gets 401 `{"detail": ...}`; a WebSocket is closed
    with 1008. `token=None`: everything passes."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and is_public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if token_matches(token_of(scope), self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        await response(scope, receive, send)


# -----------------------------------------------------------------------------
# DNS rebinding and cross-site requests


def _detail(status: int, message: str) -> dict:
    return {"detail": message}


class LoopbackGuard:
    """ASGI middleware for a server that has no token because it listens on loopback only.

    A page of another site can still reach it from the user's browser: by DNS rebinding (its own name
    resolved to 127.0.0.1, so the browser lets the page read the answers) or by a plain cross-site form
    post. The first always carries the page's name in Host, the second its site in Origin. So, on a
    server bound to loopback: a Host other than a loopback name with this port is refused (421), and so
    is an Origin other than this server's own on a request that changes something (403) or on a
    WebSocket handshake (refused before it is accepted: 403). A request without Host (HTTP/1.0) or
    without Origin comes from no browser page and passes.

    `origins`: where the server is served (`bind`'s list); their port is the one allowed, and when any
    of them is not loopback the server is reachable from elsewhere, has a token, and nothing is checked
    here. No origins: a loopback server, its port the one each connection came in on. `error(status,
    message)`: the JSON body of a refusal (`{"detail": message}`; serve-llm gives OpenAI's form)."""

    def __init__(
        self,
        app: ASGIApp,
        origins: Sequence[str] = (),
        error: Callable[[int, str], dict] = _detail,
    ):
        self.app = app
        self.error = error
        served = [urlparse(origin) for origin in origins]
        self.guarded = all(is_loopback(url.hostname or "") for url in served)
        ports = {url.port or 80 for url in served}
        self.port = ports.pop() if len(ports) == 1 else None
        self.hosts = {url.netloc.lower() for url in served}  # also a loopback address bound by name

    def _allowed(self, scope: Scope) -> set[str]:
        port = self.port
        if port is None:
            server = scope.get("server") or (None, None)
            port = server[1] if server[1] is not None else 80
        allowed = {f"{name}:{port}" for name in LOOPBACK_NAMES} | self.hosts
        if port == 80:  # a browser leaves out the default port
            allowed |= set(LOOPBACK_NAMES)
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.guarded or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        allowed = self._allowed(scope)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if host is not None and host.decode("latin-1").lower() not in allowed:
            shown = host.decode("latin-1")[:100]
            return await self._refuse(
                421,
                f"Host {shown!r} is not this server's: it serves only loopback names "
                f"({', '.join(sorted(allowed))}); a page of another site may be reaching it by DNS rebinding",
                scope,
                send,
            )
        origin = headers.get(b"origin")
        checks_origin = scope["type"] == "websocket" or scope.get("method", "GET") in UNSAFE_METHODS
        if checks_origin and origin is not None:
            given = origin.decode("latin-1").lower()
            if not given.startswith("http://") or given.removeprefix("http://") not in allowed:
                return await self._refuse(
                    403,
                    f"Origin {origin.decode('latin-1')[:100]!r} is another site: this server takes commands "
                    "only from its own pages (and from clients that send no Origin)",
                    scope,
                    send,
                )
        await self.app(scope, receive, send)

    async def _refuse(self, status: int, message: str, scope: Scope, send: Send) -> None:
        body = json.dumps(self.error(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in (scope.get("extensions") or {}):
            # Refused before the handshake is accepted, with the reason as the HTTP answer.
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})  # the server answers the upgrade 403


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """An ASGI app on uvicorn in a thread, on a free loopback port, for the length of the block;
    yields its base URL (http://127.0.0.1:PORT). The socket listens before the URL is handed out."""
    import uvicorn

    sock, url, _ = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
