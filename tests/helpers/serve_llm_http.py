"""Raw HTTP for tests/test_serve_llm.py: a junk endpoint, a request on a socket the test closes, the
OpenAI error shape, and a liveness bound for waiting."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


class Junk(BaseHTTPRequestHandler):
    """Answers every POST with 200 and no chat completion: /text/... plain text, else JSON without
    `choices`."""

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


@contextlib.contextmanager
def junk_server() -> Iterator[str]:
    """A real HTTP server (`Junk`) on a free port of 127.0.0.1 in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    return error


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """A liveness bound: `predicate` must come true within `timeout` seconds (generous on purpose)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def posted_raw(base_url: str, body: dict):
    """A chat completion POSTed on a raw socket, so the test decides when the client goes away: the
    connection closes when the block ends."""
    host, port = base_url.removeprefix("http://").split("/")[0].split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=120) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(payload), payload)
        )
        yield conn
