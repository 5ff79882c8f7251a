"""What a selfsteer server refuses and how it says so: the body limit (413, `BodyLimit`, a plain ASGI
middleware; the token is `net.BearerAuth`), the error body (`ErrorDetail`, documented with `_error`), and
the error handlers: FastAPI's list form for 422 without the input, never more than ECHO_CHARS of what a
client sent, a true Allow on 405. `server.py` puts them on every app (`_base_app`)."""

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfsteer.trainer_bridge.records import Record

MAX_BODY_BYTES = 64 * 1024  # a command is well under 1 KiB; a custom one gets room, a 50 MB upload does not
# A decision carries the observation it was made on: every metric of the run so far (a long run's is MBs).
MAX_DECISION_BYTES = 16 * 1024 * 1024
ECHO_CHARS = 200  # the most of a client's input an error message may quote


class ErrorDetail(Record):
    detail: str = Field(description="Why, in words.")


def _error(description: str) -> dict:
    return {"model": ErrorDetail, "description": description}


# -----------------------------------------------------------------------------
# plain ASGI middleware: the size of a request (the token: net.BearerAuth)


class BodyLimit:
    """Refuses (413) a request whose body is over `limit` bytes: at once by its Content-Length, else
    while it streams in, before the app reads any of it. What fits is handed on as it came."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, limits: dict[str, int] | None = None):
        self.app = app
        self.limit = limit
        self.limits = limits or {"/api/decisions": MAX_DECISION_BYTES}  # path -> its own limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.limit)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(limit, scope, receive, send)
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app hears it
            size += len(message.get("body", b""))
            if size > limit:
                return await self._refuse(limit, scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"the request body is over {limit} bytes"},
            status_code=413,
            headers={"Connection": "close"},  # the rest of the body is not read
        )
        await response(scope, receive, send)


# -----------------------------------------------------------------------------
# errors: FastAPI's list form for 422, never more than ECHO_CHARS of the input, a true Allow on 405


def _clip(text: str) -> str:
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def _loc(loc: Any) -> list:
    return [part if isinstance(part, int) else _clip(str(part)) for part in loc]


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each error's `input`: a 50 MB `type` came back whole. Where and why suffice.
    errors = [
        {
            "type": str(err.get("type", "")),
            "loc": _loc(err.get("loc", ())),
            "msg": _clip(str(err.get("msg", ""))),
        }
        for err in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def _allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _http_error(app: FastAPI) -> Callable:
    async def handler(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route on the path (POST for /api/commands).
            headers["Allow"] = ", ".join(_allowed_methods(app, request.scope))
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        return JSONResponse({"detail": _clip(detail)}, status_code=exc.status_code, headers=headers)

    return handler
