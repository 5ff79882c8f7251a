"""An OpenAI-compatible HTTP API for the embedded model (`selfsteer serve-llm`).

Any OpenAI client (the `openai` package, langchain-openai's `ChatOpenAI`, curl) can then drive
SmolLM2-135M-Instruct over real HTTP:

    selfsteer serve-llm --port 8008
    selfsteer train --llm openai:smollm2 --base-url http://127.0.0.1:8008/v1 ...

Served: `GET /v1/models` and `POST /v1/chat/completions` (plain or streamed as server-sent events,
`response_format` text / json_object / json_schema). JSON output is constrained by the engine's
grammar, so it is valid by construction (unless cut off by `max_tokens`). There is one model: any
model name is accepted, as local servers do.

Top to bottom: request models (validation at the edge), errors in OpenAI's shape, the translation of
a request into engine options, the app with its two routes, and `serve()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8008
# Without max_tokens an answer runs until the model ends its turn; this caps a runaway answer
# (the model writes ~20 tokens/s on two CPU cores).
DEFAULT_MAX_TOKENS = 1024


# ----------------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send newer options such as `user` or
# `metadata`); options that would change the answer and that we cannot honour are refused with 400.


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = DEFAULT_MODEL_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # Declared only to refuse them clearly: this model neither calls tools nor returns logprobs.
    tools: list[dict[str, Any]] | None = None
    logprobs: bool | None = None


# ----------------------------------------------------------------------------------------------------
# Errors, always in OpenAI's shape, so OpenAI clients raise their usual exception classes.


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


def _error_response(
    status: int, message: str, type: str = "invalid_request_error", param=None, code=None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


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
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in problems
        )
        return _error_response(422, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = (
                f"unknown path {request.url.path}: this server serves /v1/models and /v1/chat/completions"
            )
            return _error_response(404, message, code="not_found")
        return _error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        return _error_response(500, f"{type(error).__name__}: {error}", type="server_error")


def _bearer_check(api_key: str | None):
    """A dependency that requires `Authorization: Bearer KEY` when the server has a key."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise OpenAIError(
                401,
                "invalid API key: send `Authorization: Bearer KEY` with the key the server was started with",
                code="invalid_api_key",
            )

    return check


# ----------------------------------------------------------------------------------------------------
# From a request to the engine's options


def _engine_options(engine, request: ChatCompletionRequest) -> tuple[list[int], dict[str, Any]]:
    """(prompt token ids, keyword arguments of engine.generate) for a request; OpenAIError if the
    request asks for something this server cannot do."""
    if request.n != 1:
        raise OpenAIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if request.tools:
        raise OpenAIError(
            400,
            "tools are not supported by this model: use response_format json_schema for structured output",
            param="tools",
            code="unsupported_parameter",
        )
    if request.logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")

    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
    ]
    prompt_ids = engine.chat_prompt_ids(messages)
    context = engine.model.config.max_position_embeddings
    room = context - len(prompt_ids)
    if room < 1:  # OpenAI's code for this, which clients (langchain-openai) map to their overflow error
        raise OpenAIError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    wanted = request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    options: dict[str, Any] = {
        "max_new_tokens": min(wanted, room),
        "temperature": 0.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "seed": request.seed,
        "stop": [s for s in stop if s],
    }
    schema = _json_schema_of(request.response_format)
    if schema is not None:
        # Compiled here rather than inside generate(), so a bad schema is the client's 400,
        # not a server error.
        try:
            options["grammar"] = engine.compile_json_schema(schema)
        except Exception as error:
            # xgrammar prefixes its messages with a time and a C++ source location: keep the reason.
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()
            raise OpenAIError(
                400, f"invalid JSON schema: {reason}", param="response_format", code="invalid_schema"
            ) from error
    return prompt_ids, options


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


def create_app(engine=None, *, model_name: str = DEFAULT_MODEL_NAME, api_key: str | None = None) -> FastAPI:
    """The FastAPI app. engine: a `LocalEngine`; None loads the embedded one at startup.
    api_key: when set, every request must carry `Authorization: Bearer API_KEY`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.engine is None:
            from selfsteer.agents.local_llm import get_local_engine

            app.state.engine = await run_in_threadpool(get_local_engine)
        yield

    app = FastAPI(title="selfsteer OpenAI-compatible API", lifespan=lifespan)
    app.state.engine = engine
    _install_error_handlers(app)
    authorized = [Depends(_bearer_check(api_key))]
    created = int(time.time())

    @app.get("/v1/models", dependencies=authorized)
    async def list_models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "selfsteer"}],
        }

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest):
        engine = app.state.engine
        prompt_ids, options = await run_in_threadpool(_engine_options, engine, body)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(engine, prompt_ids, options, meta, include_usage)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        # A thread, not the event loop: the engine blocks until the answer is done, and requests that
        # wait in the engine at the same time share its forward passes (micro-batching).
        generation = await run_in_threadpool(engine.generate, prompt_ids, **options)
        return {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": generation.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": _usage(generation),
            "system_fingerprint": None,
        }

    return app


def _usage(generation) -> dict[str, int]:
    completion = len(generation.token_ids)
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": generation.prompt_tokens + completion,
    }


_FINISHED = object()


async def _stream_events(
    engine, prompt_ids: list[int], options: dict, meta: dict, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events of `chat.completion.chunk`s: the role, the text as it is generated, the
    finish reason, the usage when asked for, then `[DONE]`.

    The engine calls `on_text` on its own worker thread; the pieces cross into this event loop through
    `call_soon_threadsafe` onto an asyncio queue. The generation itself waits in a pool thread."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def on_text(piece: str) -> None:
        # Never raise here: an exception in the engine's worker would fail every request in the same
        # micro-batch. A closed loop only means this client is gone.
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

    task = asyncio.ensure_future(run_in_threadpool(engine.generate, prompt_ids, on_text=on_text, **options))
    # Scheduled after every on_text piece (call_soon_threadsafe keeps order), so it comes last.
    task.add_done_callback(lambda _: pieces.put_nowait(_FINISHED))

    yield chunk({"role": "assistant", "content": ""})
    text, sent = "", ""
    while (piece := await pieces.get()) is not _FINISHED:
        text += piece
        ready = _stream_safe_prefix(text, options["stop"])
        if len(ready) > len(sent):
            yield chunk({"content": ready[len(sent) :]})
            sent = ready
    try:
        generation = task.result()
    except Exception as error:  # headers are gone already: report in-stream, as OpenAI does
        error_body = {"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error"}}
        yield f"data: {json.dumps(error_body)}\n\n"
        return
    # The final text is authoritative (stop strings cut, a held-back tail, a last multi-byte char).
    if generation.text.startswith(sent) and len(generation.text) > len(sent):
        yield chunk({"content": generation.text[len(sent) :]})
    yield chunk({}, generation.finish_reason)
    if include_usage:
        usage_chunk = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(generation)}
        yield f"data: {json.dumps(usage_chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------------
# Serving


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None) -> None:
    """Take the port, load the model, say where the API listens, and serve until interrupted.
    The port is bound (and listening) first, so a busy port fails at once (OSError) instead of after
    the load, and a client that connects as soon as the URL is printed is queued, never refused."""
    import uvicorn

    from selfsteer.agents.local_llm import get_local_engine
    from selfsteer.trainer_bridge.server import bind

    sock, _, _ = bind(host, port)
    port = sock.getsockname()[1]  # port 0 picks a free one
    print("loading the embedded model ...", flush=True)
    engine = get_local_engine()  # before serving: the first request must not wait for the load
    app = create_app(engine, api_key=api_key)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"OpenAI-compatible API on http://{shown}:{port}/v1 (model {DEFAULT_MODEL_NAME}); Ctrl-C stops it",
        flush=True,
    )
    print(f"  point a client at it: --llm openai:smollm2 --base-url http://{shown}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
