"""serve-llm's OpenAI tool calling, end to end: a real uvicorn server on 127.0.0.1 with the real
embedded model, the real langchain-openai `ChatOpenAI` and raw httpx over real HTTP. Behaviour is
asserted (names, arguments valid against the tool's schema, finish reasons), not the model's words."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from helpers.live_run import serving
from helpers.tools import WeatherArgs, assert_calls_valid, get_time, get_weather
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI

from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.openai_server import create_app

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def base_url(one_torch_thread) -> Iterator[str]:
    with serving(create_app(get_local_engine())) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def chat(base_url) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="unused", model="smollm2", max_tokens=48, temperature=0)


def test_chat_openai_gets_a_required_call(chat):
    answer = chat.bind_tools([get_weather, get_time], tool_choice="required").invoke(
        "What is the weather in Paris?"
    )
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert_calls_valid(answer.tool_calls, {"get_weather", "get_time"})


def test_chat_openai_tool_choice_by_name(chat):
    answer = chat.bind_tools([get_weather, get_time], tool_choice="get_time").invoke(
        "What is the weather in Paris?"
    )
    assert_calls_valid(answer.tool_calls, {"get_time"})


def test_chat_openai_streams_the_call(chat):
    bound = chat.bind_tools([get_weather], tool_choice="required")
    chunks = list(bound.stream("Weather in Rome?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert sum(1 for c in chunks if c.tool_call_chunks) > 2  # the arguments come in pieces
    assert total.response_metadata["finish_reason"] == "tool_calls"
    assert_calls_valid(total.tool_calls, {"get_weather"})


def test_chat_openai_round_trip_ends_in_text(chat):
    history = [HumanMessage("What is the weather in Paris?")]
    call = chat.bind_tools([get_weather], tool_choice="required").invoke(history)
    assert_calls_valid(call.tool_calls, {"get_weather"})
    history += [
        call,
        ToolMessage(get_weather(**call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"]),
    ]
    final = chat.bind_tools([get_weather], tool_choice="none").invoke(history, max_tokens=12)
    assert final.content and not final.tool_calls
    assert final.response_metadata["finish_reason"] in ("stop", "length")


def test_raw_response_and_stream_shapes(base_url):
    body = {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "max_tokens": 48,
    }
    answer = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    WeatherArgs.model_validate(json.loads(call["function"]["arguments"]))

    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["index"] == 0 and deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(d["function"].get("arguments", "") for d in deltas)
    WeatherArgs.model_validate(json.loads(arguments))
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_assistant_tool_calls_and_tool_messages_are_accepted(base_url):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3 C, snow"},
    ]
    body = {"messages": messages, "tools": [WEATHER_TOOL], "tool_choice": "none", "max_tokens": 8}
    answer = httpx.post(f"{base_url}/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_value"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "invalid_schema",
        ),
    ],
)
def test_bad_tool_requests_are_400(base_url, change, code):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
    }
    answer = httpx.post(f"{base_url}/chat/completions", json={**body, **change}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == code
