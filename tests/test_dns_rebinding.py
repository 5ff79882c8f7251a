"""DNS rebinding and cross-site requests against the token-less loopback servers: the control server,
`selfsteer dashboard` and serve-llm, each real on loopback. A page of another site reaches them through
the user's browser with its own name in Host (rebinding) or its own site in Origin (a cross-site post):
both are refused. A server bound beyond loopback has a token and is not restricted by Host."""

from __future__ import annotations

import socket

import httpx
import pytest
from helpers.cli import served_dashboard
from helpers.live_run import serving
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from selfsteer.agents.llm.openai_server import create_app
from selfsteer.trainer_bridge.bridge import Bridge
from selfsteer.trainer_bridge.config import BridgeConfig
from selfsteer.trainer_bridge.store import Store

FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "127.0.0.1:{other}", "localhost.evil.example:{port}"]
OWN_HOSTS = ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}"]
FOREIGN_ORIGINS = ["http://evil.example", "http://127.0.0.1:{other}", "null", "https://127.0.0.1:{port}"]
OWN_ORIGINS = ["http://127.0.0.1:{port}", "http://localhost:{port}", "http://[::1]:{port}"]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _fill(patterns: list[str], port: int) -> list[str]:
    return [p.format(port=port, other=port + 1 if port < 65535 else port - 1) for p in patterns]


def check_host(url: str, path: str, error_key: str) -> None:
    """Every foreign Host is refused with 421 and a JSON reason; the loopback names with this port pass."""
    port = _port(url)
    for host in _fill(FOREIGN_HOSTS, port):
        response = httpx.get(url + path, headers={"Host": host})
        assert response.status_code == 421, (host, response.status_code, response.text)
        assert error_key in response.json() and "DNS rebinding" in response.text, response.text
    for host in _fill(OWN_HOSTS, port):
        response = httpx.get(url + path, headers={"Host": host})
        assert response.status_code == 200, (host, response.status_code, response.text)


def check_origin(url: str, post) -> None:
    """A state-changing request from a foreign Origin is refused with 403 (before it is read); from the
    server's own origins, or with no Origin (not a browser page), it goes through."""
    port = _port(url)
    for origin in _fill(FOREIGN_ORIGINS, port):
        response = post({"Origin": origin})
        assert response.status_code == 403, (origin, response.status_code, response.text)
        assert "another site" in response.text
    for origin in _fill(OWN_ORIGINS, port):
        response = post({"Origin": origin})
        assert response.status_code not in (403, 421), (origin, response.status_code, response.text)
    assert post({}).status_code not in (403, 421)


def check_websocket(url: str) -> None:
    """A WebSocket handshake with a foreign Host (the client connects to loopback but names another
    host, as a rebound page's browser does) or from a foreign Origin is refused before it is accepted."""
    port = _port(url)
    for host, origin in (
        ("evil.example", None),
        (f"evil.example:{port}", None),
        (f"127.0.0.1:{port}", "http://evil.example"),
        (f"127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"),
    ):
        with pytest.raises(InvalidStatus) as refusal:
            sock = socket.create_connection(("127.0.0.1", port))
            connect(f"ws://{host}/api/events", sock=sock, origin=origin, open_timeout=10)
        assert refusal.value.response.status_code in (403, 421), (host, origin)
    with connect(url.replace("http", "ws") + "/api/events", origin=f"http://localhost:{port}") as ws:
        assert '"state"' in ws.recv(timeout=10)


def test_the_control_server_refuses_foreign_hosts_and_origins(tmp_path):
    bridge = Bridge(BridgeConfig(port=0, db=tmp_path / "run.sqlite"))
    try:
        url = bridge.url
        check_host(url, "/api/state", "detail")
        check_host(url, "/", "detail")  # the dashboard's page too: a rebound page would script it

        def post(headers):
            return httpx.post(url + "/api/commands", json={"type": "pause"}, headers=headers)

        before = len(httpx.get(url + "/api/commands").json())
        check_origin(url, post)
        sent = httpx.get(url + "/api/commands").json()
        assert len(sent) == before + len(OWN_ORIGINS) + 1  # only what was let through was journaled
        check_websocket(url)
    finally:
        bridge.close()


def test_a_server_beyond_loopback_is_not_restricted_by_host(tmp_path):
    bridge = Bridge(BridgeConfig(host="0.0.0.0", port=0, token="s3cret", db=tmp_path / "run.sqlite"))
    try:
        url = f"http://127.0.0.1:{bridge.server.port}"
        auth = {"Authorization": "Bearer s3cret"}
        response = httpx.get(
            url + "/api/state", headers={**auth, "Host": f"trainer.example:{bridge.server.port}"}
        )
        assert response.status_code == 200, response.text
        assert httpx.get(url + "/api/state", headers={"Host": "trainer.example"}).status_code == 401
    finally:
        bridge.close()


def test_selfsteer_dashboard_refuses_foreign_hosts(tmp_path):
    db = tmp_path / "runs.sqlite"
    with Store(db) as store:
        store.create_run("one")
    with served_dashboard(db) as url:
        check_host(url, "/api/runs", "detail")
        check_host(url, "/", "detail")
        # Nothing here changes state, so any method is refused on Origin before routing (not 405).
        response = httpx.post(url + "/api/runs", headers={"Origin": "http://evil.example"})
        assert response.status_code == 403, response.text


def test_serve_llm_refuses_foreign_hosts_and_origins():
    # The guard answers before any model is asked: a stand-in engine keeps the model unloaded.
    with serving(create_app(object())) as url:
        check_host(url, "/v1/models", "error")
        response = httpx.get(url + "/v1/models", headers={"Host": "evil.example"})
        assert response.json()["error"]["code"] == "misdirected_request"

        def post(headers):
            # An empty body: a 422 past the guard, without asking the model anything.
            return httpx.post(url + "/v1/chat/completions", json={}, headers=headers)

        check_origin(url, post)
        refused = post({"Origin": "http://evil.example"}).json()
        assert refused["error"]["code"] == "forbidden_origin"
