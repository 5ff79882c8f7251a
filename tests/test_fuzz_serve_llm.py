"""serve-llm keeps the promises of its OpenAPI under schemathesis (issue 10): a real uvicorn server on
loopback, the real embedded model, every generated request sent over real HTTP and checked with every
schemathesis check (no 5xx, responses and streamed events as declared, status codes declared, invalid
requests refused, valid ones served, the API key enforced).

Bounded: a few dozen generated requests per operation, and a server whose max_tokens cap is 2, so
every answer is cheap (its OpenAPI says so: the cap is the maximum of max_tokens). The long fuzz is
`python -m selfsteer.evals.bench.fuzz_serve_llm` (1,000+ cases).
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from helpers.live_run import serving
from hypothesis import HealthCheck, settings

from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.openai_server import create_app

KEY = "fuzz-key"
CAP = 2


def make_app(engine=None):
    return create_app(engine, max_tokens_cap=CAP, api_key=KEY)


# The OpenAPI document, from an app built as the served one is (building it loads no model). Loaded at
# import, as `parametrize` needs it; the requests go to the real server of the fixture below.
# (schemathesis.pytest.from_fixture would fetch it from the live server, but fails on pytest 9:
# it reads `request.node._nodeid`, which pytest 9 no longer has.)
schema = schemathesis.openapi.from_dict(make_app().openapi())


def tool_choice_of_offered_tools(body):
    """A named tool_choice names an offered tool: OpenAPI cannot tie one field to another, and a name
    that is not offered is a 400 by design (tests/test_serve_llm_tools.py)."""
    if not isinstance(body, dict):
        return body
    tools, choice = body.get("tools"), body.get("tool_choice")
    names = [
        t["function"]["name"]
        for t in (tools if isinstance(tools, list) else [])  # negative cases send any type here
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    named = choice.get("function") if isinstance(choice, dict) else None
    if (
        names
        and isinstance(named, dict)
        and isinstance(named.get("name"), str)
        and named["name"] not in names
    ):
        return {**body, "tool_choice": {**choice, "function": {**named, "name": names[0]}}}
    return body


@pytest.fixture(scope="module")
def served(one_torch_thread):
    """The app on a real uvicorn server on 127.0.0.1 (a thread), with the embedded model; its URL."""
    with serving(make_app(get_local_engine())) as url:
        assert httpx.get(f"{url}/openapi.json").json() == make_app().openapi()  # the one fuzzed
        yield url


# One test per operation, each under its own name: schemathesis names its items by operation, but on
# pytest 9 their node ids leave the operation out, so the two operations of one test would share an id
# (pytest-xdist then schedules only one of them; tests/conftest.py refuses duplicate ids).
OPERATIONS = ("GET /v1/models", "POST /v1/chat/completions")
FUZZ = settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_every_operation_is_fuzzed():
    assert sorted(op.ok().label for op in schema.get_all_operations()) == sorted(OPERATIONS)


def fuzz(case, served):
    case.body = tool_choice_of_offered_tools(case.body)
    case.call_and_validate(base_url=served, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@schema.include(name=OPERATIONS[0]).parametrize()
@FUZZ
def test_serve_llm_models_keeps_its_openapi(case, served):
    fuzz(case, served)


@schema.include(name=OPERATIONS[1]).parametrize()
@FUZZ
def test_serve_llm_chat_completions_keeps_its_openapi(case, served):
    fuzz(case, served)
