"""An OpenAI-compatible HTTP API for the embedded model (`selfsteer serve-llm`).

Any OpenAI client (the `openai` package, langchain-openai's `ChatOpenAI`, curl) can then drive
SmolLM2-135M-Instruct over real HTTP:

    selfsteer serve-llm --port 8008
    selfsteer train --llm openai:smollm2 --base-url http://127.0.0.1:8008/v1 ...

Served: `GET /v1/models` and `POST /v1/chat/completions` (plain or streamed as server-sent events,
`response_format` text / json_object / json_schema, and OpenAI `tools` / `tool_choice` /
`parallel_tool_calls`: a call is decoded under a grammar of the tools' schemas, see `llm.tool_calls`). JSON output is constrained by the engine's
grammar, so it is valid by construction (unless cut off by `max_tokens`). There is one model: any
model name is accepted, as local servers do. The OpenAPI document (`/openapi.json`) declares every
response, errors included.

One request cannot hold the server: `max_tokens` is capped (above the cap: 400, as OpenAI answers a
`max_tokens` above a model's limit), the engine decodes every answer in progress together so a short
one never waits for a long one, an answer whose client has gone away stops within a decode step,
request bodies are limited (413), and SIGTERM ends the answers in progress (503) and the process.

The request and response models (validation at the edge, and the OpenAPI document) are in
`openai_api.py`, the errors in OpenAI's shape and the checks before the model in `openai_errors.py`.
Here, top to bottom: the translation of a request into engine options, the app with its two routes,
and `serve()`.
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
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from selfsteer.agents.llm.chat import _RetryableOutput, structured_json_text
from selfsteer.agents.llm.engine import EngineClosed
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.openai_api import (
    DEFAULT_MODEL_NAME,
    STREAM_EVENT,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ModelList,
    NamedToolChoice,
    ResponseFormat,
    error_responses,
    request_model,
)
from selfsteer.agents.llm.openai_errors import (
    BodyLimit,
    OpenAIError,
    bearer_check,
    clip,
    engine_error,
    guard_error,
    install_error_handlers,
    shutting_down,
)
from selfsteer.agents.llm.serve_limits import DEFAULT_JSON_MAX_TOKENS, DEFAULT_MAX_TOKENS_CAP
from selfsteer.agents.llm.tool_calls import (
    CallStream,
    new_call_id,
    plan_tool_answer,
    render_tool_calls,
    render_tool_result,
    split_tool_calls,
    tool_spec,
)
from selfsteer.trainer_bridge.net import LoopbackGuard, bind

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8008
# Request bodies above this get 413 before they are read: 8192 tokens of context are ~32 KB of
# text; a large JSON schema or a long conversation fits many times over.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Seconds uvicorn waits for open connections after SIGTERM (answers in progress are ended at once).
SHUTDOWN_GRACE_S = 3.0
# Seconds a request waits for one engine call made on a pool thread before its answer is generated
# (the scoring that decides between a tool call and text, a field of a structured answer); past it,
# 504. A pool thread is never held by a stuck engine for longer.
DEFAULT_ENGINE_TIMEOUT_S = 300.0
# The most properties a json_schema object may have to be built field by field. Above it the object
# is one grammar-constrained answer instead (a 400 would refuse schemas OpenAI takes): each field
# costs a pass over the whole prompt, so a large schema would cost many times what one answer costs.
FIELD_BY_FIELD_MAX_PROPERTIES = 16


# ----------------------------------------------------------------------------------------------------
# From a request to the engine's options


def _engine_options(
    engine, request: ChatCompletionRequest, max_tokens_cap: int, timeout: float | None = None
) -> tuple[list[int], dict[str, Any], bool]:
    """(prompt token ids, keyword arguments of engine.submit, whether the answer is a tool call) for
    a request; OpenAIError if the request asks for something this server cannot do. With tools, the
    choice between a call and a text answer is made here (`llm.tool_calls.plan_tool_answer`, waiting at
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
            if (failure := engine_error(error)) is not None:  # not the schema: the engine
                raise failure from error
            raise OpenAIError(
                400,
                f"invalid JSON schema in tools: {clip(_xgrammar_reason(error))}",
                param="tools",
                code="invalid_schema",
            ) from error
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
                f"invalid JSON schema: {clip(_xgrammar_reason(error))}",
                param="response_format",
                code="invalid_schema",
            ) from error
    return prompt_ids, options, grammar is not None


def _xgrammar_reason(error: Exception) -> str:
    """xgrammar prefixes its messages with a time and a C++ source location: keep the reason."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


def _chat_dict(message: ChatMessage) -> dict:
    """A request message as the chat template's role and text; tool calls and results are written
    as the model was taught them (`llm.tool_calls.render_tool_calls`, `render_tool_result`)."""
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
        raise OpenAIError(400, clip(str(error)), param="tool_choice", code="invalid_value") from error


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
            app.state.engine = await run_in_threadpool(get_local_engine)
        yield

    app = FastAPI(
        title="selfsteer OpenAI-compatible API",
        description=f"SmolLM2-135M-Instruct on the CPU. max_tokens: at most {max_tokens_cap}.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    # Outermost: another site's page reaching the model through the browser gets nothing from it.
    app.add_middleware(LoopbackGuard, origins=list(origins), error=guard_error)
    install_error_handlers(app)
    authorized = [Depends(bearer_check(api_key))] if api_key is not None else []
    auth_errors = (401,) if api_key is not None else ()
    created = int(time.time())

    @app.get(
        "/v1/models",
        dependencies=authorized,
        response_model=ModelList,
        responses=error_responses(*auth_errors),
    )
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
            answer = await _structured_completion(
                engine, schema, prompt_ids, options, engine_timeout_s, request, meta
            )
            if answer is not None:
                return answer
        return await _completion(engine, prompt_ids, options, request, meta, is_call)

    # The body's model carries this app's cap in its OpenAPI schema: a local class, so set in place of
    # the annotation (a string here, which FastAPI would look up among the module's names).
    chat_completions.__annotations__["body"] = request_model(max_tokens_cap)
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
            **error_responses(400, *auth_errors, 413, 422, 503, 504),
        },
    )(chat_completions)
    _declare_stream_chunks(app)
    return app


async def _structured_completion(
    engine,
    schema: dict,
    prompt_ids: list[int],
    options: dict,
    timeout_s: float | None,
    request: Request,
    meta: dict,
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
    answer = work.result()
    if answer is None:  # it would not fit max_tokens: the plain grammar answer says so
        return None
    text, completion_tokens = answer
    return {
        **meta,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt_ids) + completion_tokens,
        },
        "system_fingerprint": None,
    }


async def _completion(
    engine, prompt_ids: list[int], options: dict, request: Request, meta: dict, is_call: bool
):
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
            {
                "id": new_call_id(),
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
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
        )  # the budget caps every limit alike # fmt: skip
    except Exception as error:
        if (failure := engine_error(error)) is not None:
            raise failure from error
        if isinstance(error, _RetryableOutput | ValueError | RuntimeError):
            return None  # too long, or a field xgrammar cannot compile alone
        raise
    tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
    return (text, tokens) if tokens <= budget else None


def _submit(engine, prompt_ids: list[int], options: dict, **extra):
    try:
        return engine.submit(prompt_ids, **options, **extra)
    except EngineClosed as error:
        raise shutting_down(error) from error


def _result(answer: asyncio.Future):
    """The generation of a finished answer; 503 when the engine ended it (the server is stopping)."""
    try:
        return answer.result()
    except EngineClosed as error:
        raise shutting_down(error) from error


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
    body = {"error": {"message": clip(message, 1000), "type": type, "param": None, "code": code}}
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
