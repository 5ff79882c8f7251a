"""`selfsteer serve-llm`, end to end with real parts only: a real uvicorn server on 127.0.0.1 (in a
background thread), the real embedded model, the real langchain-openai client over real HTTP, raw
httpx requests, and real misbehaving endpoints (a closed port, a tiny HTTP server that answers junk).

Answers are kept short (max_tokens <= 24): the model writes ~20 tokens/s on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import httpx
import openai
import pytest
import uvicorn
from pydantic import BaseModel, Field

from selfsteer.agents.chat_models import ChatModelConfigError, describe_llm_error, make_chat_model
from selfsteer.agents.local_llm import get_local_engine
from selfsteer.agents.openai_server import DEFAULT_MODEL_NAME, create_app
from selfsteer.cli import serve_llm

API_KEY = "test-key-123"
PROMPT = "Say hello in one short sentence."


class Mood(BaseModel):
    mood: Literal["happy", "sad"]
    # A bound the grammar enforces, so the whole object fits in 24 tokens (~20 at this length).
    word: str = Field(max_length=10)


# ----------------------------------------------------------------------------------------------------
# Fixtures: real servers in background threads


@pytest.fixture(scope="module")
def engine():
    return get_local_engine()


def _run_uvicorn(app) -> Iterator[str]:
    """Serve `app` on a free port of 127.0.0.1 in a thread; yield its base URL (ending in /v1)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server takes this very socket: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(engine) -> Iterator[str]:
    yield from _run_uvicorn(create_app(engine))


@pytest.fixture(scope="module")
def keyed_url(engine) -> Iterator[str]:
    yield from _run_uvicorn(create_app(engine, api_key=API_KEY))


@pytest.fixture(scope="module")
def junk_url() -> Iterator[str]:
    """A real HTTP server that answers every POST with 200 and something that is no chat completion:
    /text/... plain text, /nochoices/... JSON without `choices`."""

    class Junk(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path.startswith("/text/"):
                body, content_type = b"hello, I am not an API", "text/plain"
            else:
                body, content_type = (
                    json.dumps({"id": "x", "object": "chat.completion"}).encode(),
                    "application/json",
                )
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _client(url: str, **kwargs):
    """ChatOpenAI on `url`, built the way selfsteer builds it: greedy, no retries, short answers."""
    kwargs.setdefault("max_tokens", 16)
    return make_chat_model("openai:smollm2", base_url=url, timeout=30, max_retries=0, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    return error


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


def test_concurrent_requests_are_all_answered(base_url):
    # batch() sends the requests at once from threads; they meet in the engine's micro-batch.
    answers = _client(base_url, max_tokens=4).batch(["Name a color.", "Name a fruit.", "Name a city."])
    assert len(answers) == 3 and all(isinstance(a.content, str) and a.content for a in answers)


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
    assert serve_llm.run(parser.parse_args(["serve-llm", "--host", "0.0.0.0"])) == 2
    assert "--api-key" in capsys.readouterr().err
