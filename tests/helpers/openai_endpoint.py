"""A scripted OpenAI-compatible endpoint on loopback, to drive the real langchain-openai client over
real HTTP.

The model behind it is scripted because it stands for a remote model that calls tools: each
/v1/chat/completions request is answered with the next item of a script (a string: a text answer; a
list of `(name, arguments)`: tool calls), or with `script(request_body)` when the script is a function,
and every request body is recorded (`requests`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Item = str | list[tuple[str, dict]]


class ScriptedOpenAI(ThreadingHTTPServer):
    """Answers each chat completion with the next scripted message (text, or tool calls)."""

    def __init__(self, script: list[Item] | Callable[[dict], Item]):
        self.script = script if callable(script) else list(script)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body: dict) -> Item:
        with self._lock:
            self.requests.append(body)
            if callable(self.script):
                return self.script(body)
            return self.script.pop(0) if self.script else "nothing more to do"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        item = self.server.answer(body)
        message = {"role": "assistant", "content": item if isinstance(item, str) else None}
        if not isinstance(item, str):
            message["tool_calls"] = [
                {
                    "id": f"call_{len(self.server.requests)}_{i}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                for i, (name, args) in enumerate(item)
            ]
        answer = {
            "id": "scripted",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if "tool_calls" in message else "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def scripted_endpoints() -> Iterator[Callable[..., ScriptedOpenAI]]:
    """`start(script)` starts a scripted endpoint; all of them are shut down on exit. In a test module:

    @pytest.fixture
    def endpoint():
        with scripted_endpoints() as start:
            yield start
    """
    servers: list[ScriptedOpenAI] = []

    def start(script) -> ScriptedOpenAI:
        server = ScriptedOpenAI(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
