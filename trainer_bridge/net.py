"""What every selfsteer server does with the network, in one place: take a port (listening before the
URL is announced), tell a loopback address from a reachable one, and check a bearer token.

The control server (`trainer_bridge.server`), `selfsteer dashboard` and `selfsteer serve-llm`
(`agents.openai_server`) all use these. Standard library only at import (starlette is imported when a
request is refused), so a command line can check its flags without loading a web framework.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlparse

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

LISTEN_BACKLOG = 2048  # uvicorn's own default


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
        origins += [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
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
