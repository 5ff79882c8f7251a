"""Fuzzing the live control server (issue 10): schemathesis, every phase and check, against the OpenAPI of
one live tiny run, with the bearer token and without, then the run is checked for harm. Bounded to about a
minute here; `python -m selfsteer.evals.bench.fuzz_api --cases 5000` is the long run."""

from __future__ import annotations

import pytest

from selfsteer.evals.bench.fuzz_api import fuzz

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fuzzing_the_live_api_finds_no_error_and_does_no_harm(tmp_path):
    result = fuzz(tmp_path, cases=300, max_time=30)
    report = "\n".join(result.lines())
    with_token, without_token = result.with_token, result.without_token
    assert with_token.cases >= 100 and without_token.cases >= 20, report
    assert not with_token.errors and not without_token.errors, (with_token.errors, without_token.errors)
    assert with_token.server_errors == 0 and without_token.server_errors == 0, report
    assert with_token.schema_violations == 0 and without_token.schema_violations == 0, report
    assert not with_token.failures and not without_token.failures, report
    assert set(without_token.statuses) == {401}, report  # every route refuses a request without the token
    assert result.harmful == 0, report
    # The fuzzer got past validation: commands were applied and training went on meanwhile.
    assert 200 in with_token.statuses and result.steps > 0, report


def test_the_warning_counter_says_when_it_stops_listening(tmp_path, capsys):
    """The report's count of warning events is only as good as the subscription: one refused (here, a
    wrong token) is said on stderr, not left to read as a run that warned of nothing."""
    import threading

    from selfsteer.evals.bench.fuzz_api import count_warnings
    from selfsteer.trainer_bridge.bridge import Bridge
    from selfsteer.trainer_bridge.config import BridgeConfig

    bridge = Bridge(BridgeConfig(port=0, token="right", db=tmp_path / "run.sqlite"))
    try:
        seen: list = []
        count_warnings(bridge.url, "wrong", seen, threading.Event())
    finally:
        bridge.close()
    assert seen == []
    assert "warning events are no longer counted" in capsys.readouterr().err
