"""Every server accepts connections before it prints its URL: a client that connects the instant the URL
line appears is never refused. Real commands (forked after the imports), real sockets, real HTTP."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfsteer.trainer_bridge.net import bind


def test_bind_returns_a_socket_that_already_accepts_connections():
    import socket

    for _ in range(20):
        sock, url, _ = bind("127.0.0.1", 0)
        with sock, socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5):
            assert url == f"http://127.0.0.1:{sock.getsockname()[1]}"


# A start costs about 3 s (train) and 6 s (serve-llm loads the model) on 2 busy cores: 5 and 3 starts
# here, 20 each in the benchmark (`python -m selfsteer.evals.bench.listen_race --trials 20`). A server that
# printed before it listened was refused on most starts, so a few already catch it.
@pytest.mark.parametrize(("server", "trials"), [("dashboard", 20), ("train", 5), ("serve-llm", 3)])
def test_a_client_connecting_the_instant_the_url_is_printed_is_never_refused(server, trials):
    result = subprocess.run(
        [sys.executable, "-m", "selfsteer.evals.bench.listen_race", "--servers", server, "--trials", str(trials)],
        capture_output=True, text=True, timeout=600,
    )  # the bench command line as typed # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{server}: {trials} starts, 0 refused" in result.stdout
