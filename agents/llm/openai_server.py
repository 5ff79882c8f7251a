"""An OpenAI-compatible HTTP API for the embedded model (`selfsteer serve-llm`).

Any OpenAI client (the `openai` package, langchain-openai's `ChatOpenAI`, curl) can then drive
SmolLM2-135M-Instruct over real HTTP:

    selfsteer serve-llm --port 8008
    selfsteer train --llm openai:smollm2 --base-url http://127.0.0.1:8008/v1 ...

Served: `GET /v1/models` and `POST /v1/chat/completions` (plain or streamed as server-sent events,
`response_format` text / json_object / json_schema, and OpenAI `tools` / `tool_choice` /
`parallel_tool_calls`: a call is decoded under a grammar of the tools' schemas, see `llm.chat`). JSON output is constrained by the engine's
grammar, so it is valid by construction (unless cut off by `max_tokens`). There is one model: any
model name is accepted, as local servers do. The OpenAPI document (`/openapi.json`) declares every
response, errors included.

One request cannot hold the server: `max_tokens` is capped (above the cap: 400, as OpenAI answers a
`max_tokens` above a model's limit), the engine decodes every answer in progress together so a short
one never waits for a long one, an answer whose client has gone away stops within a decode step,
request bodies are limited (413), and SIGTERM ends the answers in progress (503) and the process.

Top to bottom: request and response models (validation at the edge, and the OpenAPI document),
errors in OpenAI's shape, the translation of a request into engine options, the app with its two
routes, and `serve()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from selfsteer.agents.llm.chat import (
    CallStream,
    _RetryableOutput,
    new_call_id,
    plan_tool_answer,
    render_tool_calls,
    render_tool_result,
    split_tool_calls,
    structured_json_text,
    tool_spec,
)
from selfsteer.agents.llm.serve_limits import DEFAULT_JSON_MAX_TOKENS, DEFAULT_MAX_TOKENS_CAP
from selfsteer.trainer_bridge.net import LoopbackGuard, bind, token_matches

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8008
# Request bodies above this get 413 before they are read: 8192 tokens of context are ~32 KB of
# text; a large JSON schema or a long conversation fits many times over.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Seconds uvicorn waits for open connections after SIGTERM (answers in progress are ended at once).
SHUTDOWN_GRACE_S = 3.0
OPENAI_MAX_STOP = 4  # OpenAI takes at most four stop sequences
# Seconds a request waits for one engine call made on a pool thread before its answer is generated
# (the scoring that decides between a tool call and text, a field of a structured answer); past it,
# 504. A pool thread is never held by a stuck engine for longer.
DEFAULT_ENGINE_TIMEOUT_S = 300.0
# The most properties a json_schema object may have to be built field by field. Above it the object
# is one grammar-constrained answer instead (a 400 would refuse schemas OpenAI takes): each field
# costs a pass over the whole prompt, so a large schema would cost many times what one answer costs.
FIELD_BY_FIELD_MAX_PROPERTIES = 16


# ----------------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send newer options such as `user` or
# `metadata`); options that would change the answer and that we cannot honour are refused with 400.


# strict: JSON types as the schema says them (`0` is no boolean, `"1"` no number); a float field
# still takes an integer.
_REQUEST = ConfigDict(extra="ignore", strict=True)


def _integral(value):
    """JSON Schema's integer is any number without a fraction: 2.0 is one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]
TokenCount = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


class TextPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _REQUEST

    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    model_config = _REQUEST

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _REQUEST

    # "developer" is OpenAI's newer name for the system role; "tool" carries a tool's result.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(default=None, description="the call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = "response"
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _REQUEST

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = _REQUEST

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = _REQUEST

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _REQUEST

    name: str


class NamedToolChoice(BaseModel):
    model_config = _REQUEST

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _REQUEST

    model: str = DEFAULT_MODEL_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: JsonInt | None = Field(
        default=None, ge=1, description="at most the server's cap (`selfsteer serve-llm --max-tokens`)"
    )
    max_completion_tokens: JsonInt | None = Field(
        default=None, ge=1, description="a newer name of max_tokens"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: JsonInt | None = None
    stop: str | Annotated[list[str], Field(max_length=OPENAI_MAX_STOP)] | None = Field(
        default=None, description="up to 4 stop sequences"
    )
    n: JsonInt = Field(default=1, ge=1, json_schema_extra={"maximum": 1}, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="unknown tool name: 400"
    )
    parallel_tool_calls: bool | None = None
    # Declared only to refuse it clearly: this model returns no logprobs.
    logprobs: bool | None = Field(
        default=None, json_schema_extra={"enum": [False, None]}, description="not supported"
    )


def _request_model(max_tokens_cap: int) -> type[ChatCompletionRequest]:
    """The request model of an app, its OpenAPI schema naming the app's cap as the maximum of
    max_tokens (the check itself is a 400 in `_engine_options`, in OpenAI's words)."""
    cap = {"maximum": max_tokens_cap}
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        max_tokens=(
            TokenCount | None,
            Field(default=None, json_schema_extra=cap, description=f"at most {max_tokens_cap}"),
        ),
        max_completion_tokens=(
            TokenCount | None,
            Field(default=None, json_schema_extra=cap, description="a newer name of max_tokens"),
        ),
    )


# Response models: what the server answers, for the OpenAPI document (and checked on the way out).


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (the last one, asked for with
    stream_options.include_usage, has no choices and the usage)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# A streamed answer, event by event: `data:` holds a chunk, an error (the stream's headers were sent
# before it happened), or the final `[DONE]`.
STREAM_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/ChatCompletionChunk"},
                            {"$ref": "#/components/schemas/ErrorResponse"},
                        ]
                    },
                },
            ]
        },
    },
}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def _errors(*statuses: int) -> dict[int | str, dict]:
    described = {
        400: "a request this server cannot serve: an unsupported option, max_tokens above the cap, an "
        "invalid JSON schema (response_format or tools), a tool_choice naming no tool, a prompt longer than the context, a body that is not JSON",
        401: "missing or wrong API key (`Authorization: Bearer KEY`)",
        413: "the request body is too large",
        422: "a request that does not match this schema",
        503: "the server is shutting down",
        504: "the model did not answer within the server's timeout",
    }
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}


# ----------------------------------------------------------------------------------------------------
# Errors, always in OpenAI's shape, so OpenAI clients raise their usual exception classes. Nothing a
# client sent is echoed back at length: every message is clipped.


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


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_response(
    status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None
) -> JSONResponse:
    body = {
        "error": {
            "message": _clip(message, 1000),
            "type": type,
            "param": None if param is None else _clip(param, 100),
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError):
        return _error_response(error.status, error.message, error.type, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":  # not JSON at all: a bad request, not a bad field
            return _error_response(400, "the request body is not valid JSON", code="invalid_json")

        def where(problem) -> str:
            return ".".join(_clip(str(p), 40) for p in problem.get("loc", ()) if p != "body") or "body"

        # Pydantic's messages name the rule, never the value given (`input` is left out).
        message = "; ".join(f"{where(e)}: {e.get('msg')}" for e in problems[:5])
        if len(problems) > 5:
            message += f"; and {len(problems) - 5} more"
        param = _param_of(first.get("loc", ()))
        return _error_response(422, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = (
                f"unknown path {_clip(request.url.path, 100)}: this server serves /v1/models and "
                "/v1/chat/completions"
            )
            return _error_response(404, message, code="not_found")
        # 405 keeps its Allow header; 413 comes from the body limit.
        return _error_response(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        if (engine_error := _engine_error(error)) is not None:  # one no path turned into an OpenAIError
            return _error_response(engine_error.status, engine_error.message, engine_error.type,
                                   code=engine_error.code)  # fmt: skip
        return _error_response(500, f"{type(error).__name__}: {error}", type="server_error")


class _BodyLimit:
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
            response = _error_response(
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


def _guard_error(status: int, message: str) -> dict:
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
        path.append(_clip(str(part), 40))
    return ".".join(path) or None


def _bearer_check(api_key: str | None):
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


# ----------------------------------------------------------------------------------------------------
# From a request to the engine's options


def _engine_options(
    engine, request: ChatCompletionRequest, max_tokens_cap: int, timeout: float | None = None
) -> tuple[list[int], dict[str, Any], bool]:
    """(prompt token ids, keyword arguments of engine.submit, whether the answer is a tool call) for
    a request; OpenAIError if the request asks for something this server cannot do. With tools, the
    choice between a call and a text answer is made here (`llm.chat.plan_tool_answer`, waiting at
    most `timeout` seconds for the engine)."""
    if request.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if request.logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    for name in ("max_completion_tokens", "max_tokens"):
        asked = getattr(request, name)
        if asked is not None and asked > max_tokens_cap:
            # OpenAI's answer to a max_tokens above a model's limit: 400, invalid_value.
            raise OpenAIError(
                400,
                f"{name} is too large: {asked}. This server allows at most {max_tokens_cap} completion "
                f"tokens (`selfsteer serve-llm --max-tokens`).",
                param=name,
                code="invalid_value",
            )

    messages = [_chat_dict(m) for m in request.messages]
    spec = _tool_spec_of(request)
    grammar = None
    if spec is None:
        prompt_ids = engine.chat_prompt_ids(messages)
    else:
        try:
            prompt_ids, grammar = plan_tool_answer(engine, messages, spec, timeout=timeout)
        except Exception as error:  # a tool's parameters that are no JSON schema xgrammar takes
            if (engine_error := _engine_error(error)) is not None:  # not the schema: the engine
                raise engine_error from error
            raise OpenAIError(
                400, f"invalid JSON schema in tools: {_clip(_xgrammar_reason(error))}", param="tools",
                code="invalid_schema",
            ) from error  # fmt: skip
    context = engine.model.config.max_position_embeddings
    room = context - len(prompt_ids)
    if room < 1:  # OpenAI's code for this, which clients (langchain-openai) map to their overflow error
        raise OpenAIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    schema = None if grammar is not None else _json_schema_of(request.response_format)
    constrained = schema is not None or grammar is not None
    default = min(max_tokens_cap, DEFAULT_JSON_MAX_TOKENS) if constrained else max_tokens_cap
    wanted = request.max_completion_tokens or request.max_tokens or default
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    options: dict[str, Any] = {
        "max_new_tokens": min(wanted, room),
        "temperature": 0.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "seed": request.seed,
        "stop": [s for s in stop if s] if grammar is None else [],  # a stop string never cuts a call
    }
    if grammar is not None:
        options["grammar"] = grammar
    if schema is not None:
        # Compiled here rather than in the engine, so a bad schema is the client's 400, not a server
        # error.
        try:
            options["grammar"] = engine.compile_json_schema(schema)
        except Exception as error:
            raise OpenAIError(
                400,
                f"invalid JSON schema: {_clip(_xgrammar_reason(error))}",
                param="response_format",
                code="invalid_schema",
            ) from error
    return prompt_ids, options, grammar is not None


def _xgrammar_reason(error: Exception) -> str:
    """xgrammar prefixes its messages with a time and a C++ source location: keep the reason."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


def _chat_dict(message: ChatMessage) -> dict:
    """A request message as the chat template's role and text; tool calls and results are written
    as the model was taught them (`llm.chat.render_tool_calls`, `render_tool_result`)."""
    content = _no_surrogates(message.text())
    if message.role == "tool":
        return {"role": "user", "content": render_tool_result(content)}
    if message.role == "assistant" and message.tool_calls:
        calls = [
            (_no_surrogates(c.function.name), _no_surrogates(c.function.arguments))
            for c in message.tool_calls
        ]
        return {
            "role": "assistant",
            "content": render_tool_calls([(n, _json_or_text(a)) for n, a in calls], content),
        }
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def _json_or_text(arguments: str):
    """A call's arguments as sent (JSON text); re-serialised when they parse, so they read as the
    model writes them; as a JSON string otherwise."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _tool_spec_of(request: ChatCompletionRequest):
    """The request's tools as a `ToolSpec` (None: no tools); 400 for a tool_choice that names no
    offered tool, or that asks for a call without tools."""
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        choice = choice.function.name
    tools = [
        {"type": "function", "function": t.function.model_dump(exclude_none=True)}
        for t in request.tools or []
    ]
    try:
        return tool_spec(tools, choice, request.parallel_tool_calls)
    except ValueError as error:
        raise OpenAIError(400, _clip(str(error)), param="tool_choice", code="invalid_value") from error


def _no_surrogates(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates (`"\ud800"`), which no UTF-8 tokenizer takes."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _json_schema_of(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    given = response_format.json_schema
    if response_format.type == "json_schema" and given is not None and given.schema_ is not None:
        return given.schema_
    return {"type": "object"}  # json_object, or json_schema without a schema: any JSON object


def _stream_safe_prefix(text: str, stops: list[str]) -> str:
    """The part of streamed text that can be sent now: up to the first stop string, and holding back
    a tail that could still grow into one (the engine cuts stop strings only from its final text)."""
    cut = min((text.index(s) for s in stops if s in text), default=None)
    if cut is not None:
        return text[:cut]
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                hold = max(hold, length)
                break
    return text[: len(text) - hold]


# ----------------------------------------------------------------------------------------------------
# The app


def create_app(
    engine=None,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    api_key: str | None = None,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    origins: list[str] | tuple[str, ...] = (),
    engine_timeout_s: float | None = DEFAULT_ENGINE_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app. engine: a `LocalEngine`; None loads the embedded one at startup.
    api_key: when set, every request must carry `Authorization: Bearer API_KEY`.
    max_tokens_cap: the most tokens one answer may ask for (more: 400), and the default.
    max_body_bytes: the largest request body (more: 413).
    engine_timeout_s: the longest a request waits for one engine call before its answer is
    generated (more: 504; None: no limit).
    origins: where it is served (`net.bind`'s list); none: on loopback. A loopback server refuses a
    foreign Host or Origin (`net.LoopbackGuard`)."""
    if max_tokens_cap < 1:
        raise ValueError("max_tokens_cap must be at least 1")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.engine is None:
            from selfsteer.agents.llm.engine import get_local_engine

            app.state.engine = await run_in_threadpool(get_local_engine)
        yield

    app = FastAPI(
        title="selfsteer OpenAI-compatible API",
        description=f"SmolLM2-135M-Instruct on the CPU. max_tokens: at most {max_tokens_cap}.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    # Outermost: another site's page reaching the model through the browser gets nothing from it.
    app.add_middleware(LoopbackGuard, origins=list(origins), error=_guard_error)
    _install_error_handlers(app)
    authorized = [Depends(_bearer_check(api_key))] if api_key is not None else []
    auth_errors = (401,) if api_key is not None else ()
    created = int(time.time())

    @app.get("/v1/models", dependencies=authorized, response_model=ModelList, responses=_errors(*auth_errors))
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "selfsteer"}],
        }

    async def chat_completions(body: ChatCompletionRequest, request: Request):
        engine = app.state.engine
        prompt_ids, options, is_call = await run_in_threadpool(
            _engine_options, engine, body, max_tokens_cap, engine_timeout_s
        )
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(engine, prompt_ids, options, meta, include_usage, is_call)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        schema = _field_by_field_schema(body, options, is_call)
        if schema is not None:
            answer = await _structured_completion(engine, schema, prompt_ids, options, engine_timeout_s, request, meta)
            if answer is not None:
                return answer
        return await _completion(engine, prompt_ids, options, request, meta, is_call)

    # The body's model carries this app's cap in its OpenAPI schema: a local class, so set in place of
    # the annotation (a string here, which FastAPI would look up among the module's names).
    chat_completions.__annotations__["body"] = _request_model(max_tokens_cap)
    app.post(
        "/v1/chat/completions",
        dependencies=authorized,
        response_model=ChatCompletion,
        responses={
            200: {
                "description": "the answer; with `stream: true`, server-sent events of "
                "`chat.completion.chunk` objects ending with `data: [DONE]`",
                "content": {"text/event-stream": {"schema": STREAM_EVENT}},
            },
            **_errors(400, *auth_errors, 413, 422, 503, 504),
        },
    )(chat_completions)
    _declare_stream_chunks(app)
    return app


async def _structured_completion(
    engine, schema: dict, prompt_ids: list[int], options: dict, timeout_s: float | None, request: Request, meta: dict
):
    """A JSON answer decoded field by field (`_structured_answer`): several engine calls on a pool thread.
    The connection is watched as for one answer: a client that goes away cancels the field in progress and
    every one after it. None: answered the plain way instead (see `_structured_answer`)."""
    cancel: Future = Future()
    work = asyncio.ensure_future(
        run_in_threadpool(_structured_answer, engine, schema, prompt_ids, options, timeout_s, cancel)
    )
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (the server is stopping)
        gone.cancel()
        if not work.done():
            cancel.set_result(None)
            # Its CancelledError, once the thread has stopped, is expected: nobody awaits it.
            work.add_done_callback(lambda task: task.cancelled() or task.exception())
    if not work.done():  # the client is gone
        return Response(status_code=499)
    if work.result() is None:  # it would not fit max_tokens: the plain grammar answer says so
        return None
    text, completion_tokens = work.result()
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(prompt_ids) + completion_tokens},
        "system_fingerprint": None,
    }  # fmt: skip


async def _completion(engine, prompt_ids: list[int], options: dict, request: Request, meta: dict, is_call: bool):
    """One answer. Requests in the engine at the same time share its forward passes. While it generates,
    the connection is watched: a client that goes away cancels its answer (the engine drops it before its
    next decode step), instead of generating for nobody."""
    future = _submit(engine, prompt_ids, options)
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is cancelled (the server is stopping)
        gone.cancel()
        future.cancel()
    if not answer.done():  # the client is gone: nobody reads this
        answer.cancel()
        return Response(status_code=499)  # nginx's "client closed request", for the access log
    generation = _result(answer)
    message = {"role": "assistant", "content": generation.text, "refusal": None}
    finish_reason = generation.finish_reason
    if is_call:
        calls = split_tool_calls(generation.text)
        message["content"] = None
        message["tool_calls"] = [
            {"id": new_call_id(), "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ] or None
        finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(generation),
        "system_fingerprint": None,
    }


def _declare_stream_chunks(app: FastAPI) -> None:
    """Add ChatCompletionChunk to the OpenAPI components (only the event-stream schema refers to it,
    which FastAPI does not follow)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            _, defs = models_json_schema(
                [(ChatCompletionChunk, "serialization")], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _field_by_field_schema(body, options: dict, is_call: bool) -> dict | None:
    """The schema of a greedy, unstreamed json_schema answer to build field by field (see
    `_structured_answer`), or None: any other request, or an object of more than
    FIELD_BY_FIELD_MAX_PROPERTIES properties (then one grammar-constrained answer)."""
    if is_call or body.stream or options["temperature"] != 0.0:
        return None
    schema = _json_schema_of(body.response_format)
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not properties or not isinstance(properties, dict) or len(properties) > FIELD_BY_FIELD_MAX_PROPERTIES:
        return None
    return schema


def _structured_answer(
    engine, schema: dict, prompt_ids: list[int], options: dict, timeout: float | None, cancel: Future
):
    """(JSON text, its token count) of a greedy answer to a json_schema object with fields, built as the
    local chat model builds it (`structured_json_text`: a field with a finite set of values scored whole,
    the others generated), so that a client of this server gets what a process running the model gets;
    None when that answer would not fit max_tokens (the plain grammar answer then says so with
    finish_reason "length"). The fields together generate at most max_tokens tokens; each engine call
    waits at most `timeout` seconds (then 504); `cancel` done: CancelledError."""
    budget = options["max_new_tokens"]
    try:
        text = structured_json_text(
            engine, prompt_ids, schema, field_max_chars=budget, field_max_tokens=budget, max_tokens=budget,
            timeout=timeout, cancel=cancel, temperature=0.0,
        )  # fmt: skip
    except Exception as error:
        if (engine_error := _engine_error(error)) is not None:
            raise engine_error from error
        if isinstance(error, _RetryableOutput | ValueError | RuntimeError):
            return None  # too long, or a field xgrammar cannot compile alone
        raise
    tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
    return (text, tokens) if tokens <= budget else None


def _submit(engine, prompt_ids: list[int], options: dict, **extra):
    from selfsteer.agents.llm.engine import EngineClosed

    try:
        return engine.submit(prompt_ids, **options, **extra)
    except EngineClosed as error:
        raise _shutting_down(error) from error


def _result(answer: asyncio.Future):
    """The generation of a finished answer; 503 when the engine ended it (the server is stopping)."""
    from selfsteer.agents.llm.engine import EngineClosed

    try:
        return answer.result()
    except EngineClosed as error:
        raise _shutting_down(error) from error


def _shutting_down(error: Exception) -> OpenAIError:
    return OpenAIError(503, f"{error}: try again later", type="server_error", code="server_shutting_down")


def _engine_error(error: BaseException) -> OpenAIError | None:
    """The answer to an engine failure that is no fault of the request: 503 for an engine that is
    closed or closing, 504 for one that did not answer in time; None for any other error."""
    from selfsteer.agents.llm.engine import EngineClosed

    if isinstance(error, EngineClosed):
        return _shutting_down(error)
    if isinstance(error, TimeoutError):
        return OpenAIError(
            504, "the model did not answer within the server's timeout: try again later",
            type="server_error", code="timeout",
        )  # fmt: skip
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection. The body has been read by then, so the
    server's next message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(generation) -> dict[str, int]:
    completion = len(generation.token_ids)
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


_FINISHED = object()


async def _stream_events(
    engine, prompt_ids: list[int], options: dict, meta: dict, include_usage: bool, is_call: bool = False
) -> AsyncIterator[str]:
    """Server-sent events of `chat.completion.chunk`s: the role, the text as it is generated (a tool
    call: `delta.tool_calls`, each call's index, id, type and name, then pieces of its arguments, as
    OpenAI streams them), the finish reason, the usage when asked for, then `[DONE]`.

    The engine calls `on_text` on its own worker thread; the pieces cross into this event loop through
    `call_soon_threadsafe` onto an asyncio queue. When the client goes away, Starlette cancels this
    generator, and the `finally` cancels the answer in the engine."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(piece: str) -> None:
        # A closed loop only means this client is gone (the engine ignores a callback's errors).
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        body = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **({"usage": None} if include_usage else {}),
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    future = None
    try:
        try:
            future = _submit(engine, prompt_ids, options, on_text=on_text)
        except OpenAIError as error:  # headers are gone already: report in-stream, as OpenAI does
            yield _stream_error(error.message, error.type, error.code)
            return
        answer = asyncio.wrap_future(future)
        # Scheduled after every on_text piece (call_soon_threadsafe keeps order), so it comes last.
        answer.add_done_callback(lambda _: pieces.put_nowait(_FINISHED))

        yield chunk({"role": "assistant", "content": None if is_call else ""})
        text, sent = "", ""
        calls = CallStream()
        while (piece := await pieces.get()) is not _FINISHED:
            if is_call:
                for delta in _tool_call_deltas(calls, piece):
                    yield chunk(delta)
                continue
            text += piece
            ready = _stream_safe_prefix(text, options["stop"])
            if len(ready) > len(sent):
                yield chunk({"content": ready[len(sent) :]})
                sent = ready
        try:
            generation = _result(answer)
        except OpenAIError as error:
            yield _stream_error(error.message, error.type, error.code)
            return
        except Exception as error:
            yield _stream_error(f"{type(error).__name__}: {error}", "server_error")
            return
        # The final text is authoritative (stop strings cut, a held-back tail, a last multi-byte char).
        finish_reason = generation.finish_reason
        if is_call:
            if generation.text.startswith(calls.text):
                for delta in _tool_call_deltas(calls, generation.text[len(calls.text) :]):
                    yield chunk(delta)
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        elif generation.text.startswith(sent) and len(generation.text) > len(sent):
            yield chunk({"content": generation.text[len(sent) :]})
        yield chunk({}, finish_reason)
        if include_usage:
            usage_chunk = {
                **meta,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": _usage(generation),
            }
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # finished, failed, or the client went away: nothing generates for nobody
        if future is not None:
            future.cancel()


def _tool_call_deltas(calls: CallStream, piece: str) -> list[dict]:
    """The `delta`s for a new piece of a call's text: a new call (index, id, type, name, empty
    arguments), or more of a call's arguments."""
    calls.text += piece
    deltas = []
    for index, call_id, name, arguments in calls.deltas():
        if call_id is not None:
            function = {"name": name, "arguments": ""}
            deltas.append(
                {"tool_calls": [{"index": index, "id": call_id, "type": "function", "function": function}]}
            )
        elif arguments:
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
    return deltas


def _stream_error(message: str, type: str, code: str | None = None) -> str:
    body = {"error": {"message": _clip(message, 1000), "type": type, "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\n"


# ----------------------------------------------------------------------------------------------------
# Serving


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    adapter: str | Path | None = None,
) -> None:
    """Take the port, load the model (with `adapter`, a LoRA folder, merged in), say where the API listens, and serve until interrupted.
    The port is bound (and listening) first, so a busy port fails at once (OSError) instead of after
    the load, and a client that connects as soon as the URL is printed is queued, never refused.

    SIGTERM or Ctrl-C: the answers in progress end at once (their clients get 503, or an error event
    in a stream), open connections get SHUTDOWN_GRACE_S seconds to close, then the process exits."""
    import uvicorn

    from selfsteer.agents.llm.engine import get_local_engine

    sock, _, origins = bind(host, port)
    port = sock.getsockname()[1]  # port 0 picks a free one
    print("loading the embedded model ...", flush=True)
    engine = get_local_engine(adapter)  # before serving: the first request must not wait for the load
    app = create_app(engine, api_key=api_key, max_tokens_cap=max_tokens_cap, origins=origins)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # Signal-safe: only sets a flag, which the engine's worker reads between decode steps.
            engine.close(timeout=0, cancel=True, reason="the server is shutting down")

    shown = f"[{host}]" if ":" in host else host
    print(
        f"OpenAI-compatible API on http://{shown}:{port}/v1 (model {DEFAULT_MODEL_NAME}"
        f"{'' if adapter is None else ' + adapter ' + str(adapter)}, "
        f"max_tokens <= {max_tokens_cap}); Ctrl-C stops it",
        flush=True,
    )
    print(f"  point a client at it: --llm openai:smollm2 --base-url http://{shown}:{port}/v1", flush=True)
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close(cancel=True, reason="the server is shutting down")
