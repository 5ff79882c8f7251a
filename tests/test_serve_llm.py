"""`selfsteer serve-llm`, end to end with real parts only: a real uvicorn server on 127.0.0.1 (in a
background thread), the real embedded model, the real langchain-openai client over real HTTP, raw
httpx requests, real misbehaving endpoints (a closed port, a tiny HTTP server that answers junk), and
the real `selfsteer serve-llm` process for SIGTERM.

Answers are kept short (max_tokens <= 24) except where a long one is the point (one request must not
hold the server): those are cancelled as soon as the test has seen what it needs. The model writes
~20 tokens/s on two CPU cores. Waits are liveness bounds (a generous deadline), never timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Literal

import httpx
import openai
import pytest
from helpers.live_run import serving
from helpers.serve_llm_http import assert_openai_error as _assert_openai_error
from helpers.serve_llm_http import junk_server, posted_raw
from helpers.serve_llm_http import wait_until as _wait_until
from pydantic import BaseModel, Field

from selfsteer.agents.chat_models import ChatModelConfigError, describe_llm_error, make_chat_model
from selfsteer.agents.llm import openai_server
from selfsteer.agents.llm.engine import LocalEngine
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.openai_server import DEFAULT_MODEL_NAME, create_app
from selfsteer.cli import serve_llm
from selfsteer.cli.commands import serve_llm as serve_llm_command

API_KEY = "test-key-123"
PROMPT = "Say hello in one short sentence."
# Measured: the model goes on past 300 tokens for this one.
LONG_PROMPT = "List the numbers from 1 to 1000, separated by commas."
CAP = 24  # the max_tokens cap of the `capped_url` server


class Mood(BaseModel):
    mood: Literal["happy", "sad"]
    # A bound the grammar enforces, so the whole object fits in 24 tokens (~20 at this length).
    word: str = Field(max_length=10)


# ----------------------------------------------------------------------------------------------------
# Fixtures: real servers in background threads


@pytest.fixture(scope="module")
def engine(one_torch_thread):
    return get_local_engine()


def _run_uvicorn(app) -> Iterator[str]:
    """Serve `app` on a free port of 127.0.0.1 in a thread; yield its base URL (ending in /v1)."""
    with serving(app) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def base_url(engine) -> Iterator[str]:
    yield from _run_uvicorn(create_app(engine))


@pytest.fixture(scope="module")
def keyed_url(engine) -> Iterator[str]:
    yield from _run_uvicorn(create_app(engine, api_key=API_KEY))


@pytest.fixture(scope="module")
def capped_url(engine) -> Iterator[str]:
    yield from _run_uvicorn(create_app(engine, max_tokens_cap=CAP, max_body_bytes=4096))


@pytest.fixture(scope="module")
def junk_url() -> Iterator[str]:
    """A real HTTP server that answers every POST with 200 and something that is no chat completion:
    /text/... plain text, /nochoices/... JSON without `choices`."""
    with junk_server() as url:
        yield url


def _client(url: str, **kwargs):
    """ChatOpenAI on `url`, built the way selfsteer builds it: greedy, no retries, short answers."""
    kwargs.setdefault("max_tokens", 16)
    return make_chat_model("openai:smollm2", base_url=url, timeout=30, max_retries=0, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Through langchain-openai's ChatOpenAI


def test_invoke_returns_text(base_url):
    answer = _client(base_url).invoke(PROMPT)
    assert isinstance(answer.content, str) and answer.content.strip()
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["output_tokens"] <= 16
    assert answer.usage_metadata["input_tokens"] > 0


def test_stream_concatenates_to_the_greedy_answer(base_url):
    model = _client(base_url)
    whole = model.invoke(PROMPT).content
    chunks = list(model.stream(PROMPT, stream_usage=True))
    pieces = [chunk.content for chunk in chunks if chunk.content]
    assert len(pieces) >= 3  # streamed as it is generated, not in one piece
    assert "".join(pieces) == whole
    assert any(c.usage_metadata and c.usage_metadata["output_tokens"] > 0 for c in chunks)  # usage chunk


def test_concurrent_requests_share_forward_passes(base_url, engine):
    # batch() sends the requests at once from threads. The engine's worker is held in a decode step
    # until all three wait in its queue, so they are taken in together whatever the machine's speed.
    prompts = ["Name a color.", "Name a fruit.", "Name a city."]
    answers: list = []
    with _worker_held(engine):
        before = dict(engine.stats)
        sender = threading.Thread(
            target=lambda: answers.extend(_client(base_url, max_tokens=4).batch(prompts)), daemon=True
        )
        sender.start()
        _wait_until(lambda: engine.queued == len(prompts), "the three requests wait in the engine")
    sender.join(timeout=120)
    assert len(answers) == 3 and all(isinstance(a.content, str) and a.content for a in answers)
    assert engine.stats["requests"] - before["requests"] == 3
    assert engine.stats["batches"] - before["batches"] == 1  # started together
    # Shared passes: each decode step gives every one of them its next token, so the steps are those
    # of the longest answer (its first token comes from its prefill, its end of turn from a step),
    # plus one: the step that drops the held answer before they are taken in. One by one they would
    # take a step per token of each.
    longest = max(a.usage_metadata["output_tokens"] for a in answers)
    assert engine.stats["steps"] - before["steps"] <= longest + 1


def test_structured_output_json_schema(base_url):
    model = _client(base_url, max_tokens=24).with_structured_output(Mood, method="json_schema")
    answer = model.invoke("Describe a sunny day in one word.")
    assert isinstance(answer, Mood)
    assert answer.mood in ("happy", "sad") and len(answer.word) <= 10


# ----------------------------------------------------------------------------------------------------
# Raw HTTP


def test_models_lists_the_model(base_url):
    response = httpx.get(f"{base_url}/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [DEFAULT_MODEL_NAME]


def test_response_format_json_schema_gives_valid_json(base_url):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer"}},
        "required": ["ok", "count"],
    }
    response = httpx.post(
        f"{base_url}/chat/completions",
        json={
            "model": "anything-goes",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Count to three."}]}],
            "max_tokens": 24,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"] and body["created"] and body["model"]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    assert isinstance(value["ok"], bool) and isinstance(value["count"], int)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_stop_string_is_never_sent(base_url):
    request = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "stop": [" "]}
    plain = httpx.post(f"{base_url}/chat/completions", json=request, timeout=30).json()
    events = []
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json={**request, "stream": True}, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == plain["choices"][0]["message"]["content"] and " " not in text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_above_one_is_refused(base_url):
    response = httpx.post(
        f"{base_url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 2}
    )
    assert _assert_openai_error(response, 400)["param"] == "n"


def test_malformed_requests_get_openai_errors(base_url):
    url = f"{base_url}/chat/completions"
    not_json = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    _assert_openai_error(not_json, 400)
    bad_role = httpx.post(url, json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert "messages" in _assert_openai_error(bad_role, 422)["param"]
    bad_schema = httpx.post(
        url,
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nope"}},
            },
        },
    )
    assert _assert_openai_error(bad_schema, 400)["param"] == "response_format"
    _assert_openai_error(httpx.get(f"{base_url}/nowhere"), 404)


# ----------------------------------------------------------------------------------------------------
# Failures a user meets, and the line describe_llm_error gives for them


def test_api_key_is_required_when_set(keyed_url):
    assert httpx.get(f"{keyed_url}/models").status_code == 401
    assert httpx.get(f"{keyed_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(keyed_url, api_key="wrong-key").invoke("hi")
    assert "API key" in describe_llm_error(caught.value, "openai:smollm2", keyed_url)


def test_right_api_key_through_chat_openai(keyed_url):
    assert _client(keyed_url, api_key=API_KEY, max_tokens=4).invoke("hi").content


def test_unreachable_endpoint_fails_fast():
    with socket.socket() as probe:  # a port that was free a moment ago, and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with pytest.raises(openai.APIConnectionError) as caught:
        make_chat_model("openai:smollm2", base_url=url, timeout=2, max_retries=0).invoke("hi")
    assert time.monotonic() - started < 5
    assert "cannot reach" in describe_llm_error(caught.value, "openai:smollm2", url)


@pytest.mark.parametrize("path, problem", [("text", "not JSON"), ("nochoices", "'choices'")])
def test_malformed_response_is_described(junk_url, path, problem):
    url = f"{junk_url}/{path}/v1"
    with pytest.raises(Exception) as caught:  # noqa: B017 - the client raises plain ValueError/TypeError
        make_chat_model("openai:smollm2", base_url=url, timeout=5, max_retries=0).invoke("hi")
    line = describe_llm_error(caught.value, "openai:smollm2", url)
    assert "malformed response" in line and problem in line and url in line


def test_model_spec_errors(monkeypatch):
    for name in ("OPENAI_API_KEY", "SELFSTEER_API_KEY", "OPENAI_BASE_URL", "SELFSTEER_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ChatModelConfigError, match="API key"):
        make_chat_model("openai:x")
    with pytest.raises(ChatModelConfigError, match="unknown model"):
        make_chat_model("bogus")


def test_cli_refuses_a_public_host_without_a_key(monkeypatch, capsys):
    monkeypatch.delenv("SELFSTEER_SERVE_API_KEY", raising=False)
    parser = argparse.ArgumentParser(prog="selfsteer")
    serve_llm.add_parser(parser.add_subparsers(), "serve-llm")
    assert serve_llm_command.run(parser.parse_args(["serve-llm", "--host", "0.0.0.0"])) == 2
    assert "--api-key" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# One request cannot hold the server (issue 10)


@contextlib.contextmanager
def _worker_held(engine) -> Iterator[None]:
    """Holds the engine's worker inside a decode step (an answer's on_text waits on an event) for the
    length of the block: whatever is submitted meanwhile waits in the engine's queue, and an engine
    call with a timeout runs out, however fast the machine is."""
    entered, release = threading.Event(), threading.Event()

    def hold(_piece: str) -> None:
        entered.set()
        release.wait()

    prompt = engine.chat_prompt_ids([{"role": "user", "content": PROMPT}])
    blocker = engine.submit(prompt, max_new_tokens=64, on_text=hold)
    try:
        _wait_until(entered.is_set, "the worker is held")
        yield
    finally:
        blocker.cancel()
        release.set()


def _chat(url: str, **body) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": PROMPT}])
    return httpx.post(f"{url}/chat/completions", json=body, timeout=120)


def test_max_tokens_above_the_cap_is_refused_naming_the_cap(capped_url):
    for name in ("max_tokens", "max_completion_tokens"):
        error = _assert_openai_error(_chat(capped_url, **{name: 100000}), 400)
        assert error["param"] == name and error["code"] == "invalid_value"
        assert f"at most {CAP}" in error["message"] and "100000" in error["message"]
    assert _chat(capped_url, max_tokens=CAP).status_code == 200  # the cap itself is allowed


def test_without_max_tokens_an_answer_is_bounded_by_the_cap(capped_url):
    response = _chat(capped_url, messages=[{"role": "user", "content": LONG_PROMPT}])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == CAP
    assert body["choices"][0]["finish_reason"] == "length"


def test_json_answers_without_max_tokens_get_the_json_default(base_url, monkeypatch):
    monkeypatch.setattr(openai_server, "DEFAULT_JSON_MAX_TOKENS", 6)
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}}
    response = _chat(
        base_url,
        messages=[{"role": "user", "content": "Tell a story."}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 6


def test_a_short_request_completes_while_a_long_one_generates(base_url, engine):
    events: list[dict] = []
    finished = threading.Event()
    stop_reading = threading.Event()

    def long_stream():
        body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line.removeprefix("data: ")))
                    if events[-1]["choices"] and events[-1]["choices"][0]["finish_reason"]:
                        finished.set()
                if stop_reading.is_set():
                    return  # closing the stream cancels the long answer

    reader = threading.Thread(target=long_stream, daemon=True)
    reader.start()
    try:
        _wait_until(lambda: len(events) >= 3, "the long answer streams")
        # Before continuous batching this waited for all 1000 tokens (minutes) and timed out.
        short = httpx.post(
            f"{base_url}/chat/completions",
            json={"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4},
            timeout=60,
        )
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] >= 1
        assert not finished.is_set(), "the long answer ended before the short one was served"
    finally:
        stop_reading.set()
        reader.join(timeout=60)
    _wait_until(lambda: engine.stats["running"] == 0, "the long answer is cancelled once its client left")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_abandoned_request_stops_generating(base_url, engine, stream):
    before = dict(engine.stats)
    body = {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1000, "stream": stream}
    # A raw socket: the client sends its request, waits until the answer is being generated (the
    # first chunk of a stream; a plain answer has none before its end), then closes the connection.
    with posted_raw(base_url, body) as conn:
        if stream:
            received = b""
            while b'data: {"id"' not in received:
                received += conn.recv(4096)
        _wait_until(lambda: engine.stats["steps"] - before["steps"] >= 5, "the answer is being generated")
    _wait_until(lambda: engine.stats["cancelled"] > before["cancelled"], "the answer is cancelled")
    _wait_until(lambda: engine.stats["running"] == 0, "its place in the engine is free")
    assert engine.stats["steps"] - before["steps"] < 1000  # it did not run to its max_tokens


def test_an_engine_that_is_shutting_down_answers_503(engine):
    closing = LocalEngine(engine.model, engine.tokenizer)  # the same weights, its own worker
    closing.close(cancel=True, reason="the server is shutting down")
    for url in _run_uvicorn(create_app(closing)):
        error = _assert_openai_error(_chat(url, max_tokens=2), 503)
        assert error["code"] == "server_shutting_down" and "shutting down" in error["message"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# Both ask the engine something before the answer is generated: whether to call a tool (scored), and
# the first field's value (scored: it is one of a finite set).
BEFORE_GENERATION = {
    "tools": {"tools": [WEATHER_TOOL], "tool_choice": "auto"},
    "fields": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "m", "schema": Mood.model_json_schema()},
        }
    },
}


@pytest.mark.parametrize("asks", BEFORE_GENERATION.values(), ids=BEFORE_GENERATION.keys())
def test_a_closed_engine_answers_503_before_generation_too(engine, asks):
    # Before the fix the tool-choice scoring's EngineClosed became 400 invalid_schema ("tools").
    closing = LocalEngine(engine.model, engine.tokenizer)  # the same weights, its own worker
    closing.close(cancel=True, reason="the server is shutting down")
    for url in _run_uvicorn(create_app(closing)):
        error = _assert_openai_error(_chat(url, max_tokens=8, **asks), 503)
        assert error["code"] == "server_shutting_down" and error["type"] == "server_error"


@pytest.mark.parametrize("asks", BEFORE_GENERATION.values(), ids=BEFORE_GENERATION.keys())
def test_an_engine_that_does_not_answer_in_time_gets_504(engine, asks):
    # The worker is held, so the engine's answer cannot come within any timeout.
    for url in _run_uvicorn(create_app(engine, engine_timeout_s=0.2)):
        with _worker_held(engine):
            error = _assert_openai_error(_chat(url, max_tokens=8, **asks), 504)
        assert error["code"] == "timeout" and error["type"] == "server_error"


def _fields_schema(count: int, field: dict) -> dict:
    names = [f"f{n}" for n in range(count)]
    return {"type": "object", "properties": dict.fromkeys(names, field), "required": names}


def test_field_by_field_json_is_bounded_by_max_tokens(base_url, engine):
    # Eight generated fields of six tokens each (` [1, 2]`): before the fix each field had the whole
    # max_tokens, so all eight were generated (48 tokens, 40 decode steps), found too long, and
    # generated again as one grammar answer.
    digits = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = _fields_schema(8, {"type": "array", "items": digits, "minItems": 2, "maxItems": 2})
    max_tokens = 12
    before = dict(engine.stats)
    response = _chat(
        base_url,
        max_tokens=max_tokens,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= max_tokens
    # A decode step per generated token after each answer's first: at most max_tokens in the
    # field-by-field attempt, at most max_tokens more in the grammar answer that replaces it.
    assert engine.stats["steps"] - before["steps"] <= 2 * max_tokens


def test_a_schema_with_many_fields_is_answered_in_one_generation(base_url, engine):
    # Field by field, each of these would cost a scoring pass over the prompt; beyond the cap the
    # whole object is one grammar-constrained answer.
    schema = _fields_schema(openai_server.FIELD_BY_FIELD_MAX_PROPERTIES + 1, {"type": "boolean"})
    before = dict(engine.stats)
    response = _chat(
        base_url,
        max_tokens=8,
        response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": schema}},
    )
    assert response.status_code == 200, response.text
    assert engine.stats["requests"] - before["requests"] == 1


def test_an_abandoned_field_by_field_answer_stops_generating(base_url, engine):
    # The first field must hold 200 numbers (hundreds of tokens); the client leaves while it is
    # generated. Before the fix nothing watched the connection on this path.
    schema = {
        "type": "object",
        "properties": {
            "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 200},
            "done": {"type": "boolean"},
        },
        "required": ["numbers", "done"],
    }
    body = {
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": 1000,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    }
    before = dict(engine.stats)
    with posted_raw(base_url, body):
        _wait_until(lambda: engine.stats["steps"] - before["steps"] >= 5, "the field is being generated")
    _wait_until(lambda: engine.stats["cancelled"] > before["cancelled"], "the field is cancelled")
    _wait_until(lambda: engine.stats["running"] == 0, "its place in the engine is free")
    assert engine.stats["requests"] - before["requests"] == 1  # and no field after it was asked for


def test_sigterm_stops_the_server_while_it_generates():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "selfsteer.cli.main", "serve-llm", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        for line in process.stdout:
            if match := re.search(r"(http://127\.0\.0\.1:\d+/v1)", line):
                url = match.group(1)
                break
        assert url, "serve-llm printed no URL"
        threading.Thread(target=process.stdout.read, daemon=True).start()
        lines: list[str] = []
        streaming = threading.Event()

        def read_stream():  # a client streaming a long answer (measured: 700 tokens and on)
            body = {
                "messages": [{"role": "user", "content": LONG_PROMPT}],
                "max_tokens": 1000,
                "stream": True,
            }
            with (
                contextlib.suppress(httpx.HTTPError),  # the connection may close under the last chunk
                httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=300) as response,
            ):
                for line in response.iter_lines():
                    lines.append(line)
                    if len(lines) >= 6:
                        streaming.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        _wait_until(streaming.is_set, "the answer streams")
        os.kill(process.pid, signal.SIGTERM)  # while it generates
        # What makes the exit quick is asserted, not how quick it is (evals/bench/serve_llm.py's
        # `sigterm` scenario prints the seconds): the signal handler cancels the answer in progress.
        # A handler that only stopped uvicorn would leave the stream running until uvicorn's grace
        # period cut its connection, with no word to the client. The bound is a hang guard only.
        # uvicorn re-raises the signal once its own shutdown is done: the exit status says SIGTERM.
        assert process.wait(timeout=60) == -signal.SIGTERM
        reader.join(timeout=60)
        assert not reader.is_alive()
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
        # The stream's last event is the cancellation's error, sent while the connection was open.
        error = events[-1].get("error") or {}
        assert error.get("code") == "server_shutting_down", lines[-3:]
        assert "shutting down" in error["message"]
        chunks = events[:-1]
        assert len(chunks) >= 3 and all("error" not in e for e in chunks)  # those awaited before the signal
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # cut short, not finished
        assert "data: [DONE]" not in lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_tiny_temperature_decodes_greedily(base_url):
    # 1 / 1e-300 overflows: sampling would divide the logits into inf and NaN.
    greedy = _chat(base_url, max_tokens=4)
    tiny = _chat(base_url, max_tokens=4, temperature=1e-300)
    assert tiny.status_code == 200, tiny.text
    assert (
        tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
    )


# A free-text field the untrained model fills with a loop ("The new learning rate is 1.000000. The new
# learning rate is 1.000000. The new learning rate is 2.000000. ..."): measured before the repetition
# guard, 346 tokens and the whole 800 characters of maxLength.
DECISION_SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ["double", "halve", "keep"]},
        "explanation": {"type": "string", "maxLength": 800},
    },
    "required": ["action", "explanation"],
    "additionalProperties": False,
}
LOOPING_DECISION = [
    {
        "role": "system",
        "content": "You supervise the training of a neural network. You see its recent metric history and "
        "decide whether to double, halve or keep the learning rate.",
    },
    {"role": "user", "content": "Loss: 1.000000. Learning rate: 1.000000. Gradient norm: 1.000000. Decide."},
]


def test_a_looping_free_text_field_is_closed(base_url):
    response = _chat(
        base_url,
        messages=LOOPING_DECISION,
        response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": DECISION_SCHEMA}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    decision = json.loads(body["choices"][0]["message"]["content"])  # closed: valid JSON
    assert decision["action"] in ("double", "halve", "keep")
    assert len(decision["explanation"]) < 400  # the loop was cut, not run to maxLength
    assert body["usage"]["completion_tokens"] < 150


def test_the_in_process_structured_output_closes_a_loop_too(engine):
    # The same guard serves LocalChatModel's structured output (the engine is shared). Measured before
    # it: "The best is now halved. The best is now halved. ..." up to the field's 400 characters.
    from selfsteer.agents.decision import LRDecision
    from selfsteer.agents.llm.chat import LocalChatModel
    from selfsteer.agents.observation import Observation
    from selfsteer.agents.supervisors import LLMSupervisor

    model = LocalChatModel(max_retries=0)
    losses = [(step, 3.0 - step / 1000) for step in range(50, 450, 50)]
    observation = Observation(step=400, lr=1.0, max_steps=300, eval_loss=losses, train_loss=losses)
    messages = LLMSupervisor(model, strategy="compact_stats").messages(observation)
    result = model.with_structured_output(LRDecision, include_raw=True).invoke(messages)
    assert result["parsing_error"] is None and result["parsed"] is not None
    assert len(result["parsed"].explanation) < 300


def test_huge_bodies_get_413_before_they_are_read(capped_url):
    url = f"{capped_url}/chat/completions"
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 10_000}]}).encode()
    said = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    assert _assert_openai_error(said, 413)["code"] == "request_too_large"
    assert "4096 bytes" in said.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies as the body arrives
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    unsaid = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    _assert_openai_error(unsaid, 413)
    assert len(unsaid.text) < 1000


def test_errors_never_echo_large_input(base_url):
    long_path = httpx.get(f"{base_url}/{'a' * 5000}")
    error = _assert_openai_error(long_path, 404)
    assert len(error["message"]) < 400
    schema = {"type": "object", "properties": {"x": {"type": "nope" * 2000}}}
    bad_schema = _chat(
        base_url, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert len(_assert_openai_error(bad_schema, 400)["message"]) < 400
    bad_role = _chat(base_url, messages=[{"role": "r" * 5000, "content": "hi"}])
    assert len(_assert_openai_error(bad_role, 422)["message"]) < 1000


def test_json_types_are_as_the_openapi_says(base_url):
    # Found by schemathesis: `0` passed as a boolean, 5 stop sequences passed a schema without a bound.
    assert _assert_openai_error(_chat(base_url, max_tokens=2, logprobs=0), 422)["param"] == "logprobs"
    assert _assert_openai_error(_chat(base_url, max_tokens=2, stream=1), 422)["param"] == "stream"
    assert _assert_openai_error(_chat(base_url, max_tokens=2, stop=["a"] * 5), 422)["param"] == "stop"
    assert _chat(base_url, max_tokens=2.0).status_code == 200  # an integer, for JSON Schema
    assert _assert_openai_error(_chat(base_url, max_tokens=2.5), 422)["param"] == "max_tokens"


def test_wrong_method_gets_405_with_allow(base_url):
    response = httpx.get(f"{base_url}/chat/completions")
    _assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_openapi_declares_the_responses(capped_url, keyed_url):
    spec = httpx.get(capped_url.removesuffix("/v1") + "/openapi.json").json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "413", "422", "503", "504"}  # no 401: no key here
    for status in ("400", "413", "422", "503", "504"):
        assert chat["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert request["max_tokens"]["maximum"] == CAP
    keyed = httpx.get(keyed_url.removesuffix("/v1") + "/openapi.json").json()
    assert "401" in keyed["paths"]["/v1/models"]["get"]["responses"]
    assert keyed["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_compiled_grammars_are_bounded(engine):
    # Every new response_format schema a client sends compiles into a grammar; they must not pile up.
    for n in range(100):
        engine.compile_json_schema({"type": "object", "properties": {f"field{n}": {"type": "integer"}}})
    assert len(engine._grammar_cache) < 100
