"""Errors of `selfsteer serve-llm` (agents/llm/openai_server.py), always in OpenAI's shape, so OpenAI clients
raise their usual exception classes; and the checks that refuse a request before the model sees it (the
body limit, the API key). Nothing a client sent is echoed back at length: every message is clipped."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfsteer.agents.llm.engine import EngineClosed
from selfsteer.trainer_bridge.net import token_matches


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(
    status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    body = {
        "error": {
            "message": clip(message, 1000),
            "type": type,
            "param": None if param is None else clip(param, 100),
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return error_response(error.status, error.message, error.type, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":  # not JSON at all: a bad request, not a bad field
            return error_response(400, "the request body is not valid JSON", code="invalid_json")

        def where(problem) -> str:
            return ".".join(clip(str(p), 40) for p in problem.get("loc", ()) if p != "body") or "body"

        # Pydantic's messages name the rule, never the value given (`input` is left out).
        message = "; ".join(f"{where(e)}: {e.get('msg')}" for e in problems[:5])
        if len(problems) > 5:
            message += f"; and {len(problems) - 5} more"
        param = _param_of(first.get("loc", ()))
        return error_response(422, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = (
                f"unknown path {clip(request.url.path, 100)}: this server serves /v1/models and "
                "/v1/chat/completions"
            )
            return error_response(404, message, code="not_found")
        # 405 keeps its Allow header; 413 comes from the body limit.
        return error_response(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        if (failure := engine_error(error)) is not None:  # one no path turned into an OpenAIError
            return error_response(failure.status, failure.message, failure.type, code=failure.code)
        return error_response(500, f"{type(error).__name__}: {error}", type="server_error")


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, before it is read when it says
    its length (Content-Length), as soon as it passes the limit when it does not (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than this server's limit of {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = error_response(
                413, too_large, code="request_too_large", headers={"Connection": "close"}
            )
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # raised inside the app: its handlers answer 413
                    raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def guard_error(status: int, message: str) -> dict:
    """`net.LoopbackGuard`'s refusals in OpenAI's form."""
    code = "misdirected_request" if status == 421 else "forbidden_origin"
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _param_of(loc) -> str | None:
    """The request field a validation error is about (`messages.0.role`), without pydantic's names of
    the union member it tried (`stop.str`, `content.list[TextPart]`)."""
    path = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (
            not part.isidentifier() or part in ("str", "int", "float", "bool", "list")
        ):
            break
        path.append(clip(str(part), 40))
    return ".".join(path) or None


def bearer_check(api_key: str | None):
    """A dependency that requires `Authorization: Bearer KEY` when the server has a key (declared in
    the OpenAPI document as an HTTP bearer scheme). A dependency, not the control server's middleware
    (`net.BearerAuth`): the errors take OpenAI's form and an unknown path stays 404; the check is the
    same (`net.token_matches`)."""
    bearer = HTTPBearer(auto_error=False, description="the key the server was started with")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials.strip() if credentials else ""
        if not token_matches(given, api_key):
            raise OpenAIError(
                401,
                "invalid API key: send `Authorization: Bearer KEY` with the key the server was started with",
                code="invalid_api_key",
            )

    return check


def shutting_down(error: Exception) -> OpenAIError:
    return OpenAIError(503, f"{error}: try again later", type="server_error", code="server_shutting_down")


def engine_error(error: BaseException) -> OpenAIError | None:
    """The answer to an engine failure that is no fault of the request: 503 for an engine that is
    closed or closing, 504 for one that did not answer in time; None for any other error."""
    if isinstance(error, EngineClosed):
        return shutting_down(error)
    if isinstance(error, TimeoutError):
        return OpenAIError(
            504,
            "the model did not answer within the server's timeout: try again later",
            type="server_error",
            code="timeout",
        )
    return None
