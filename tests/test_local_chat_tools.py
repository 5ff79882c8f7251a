"""Tool calling on the embedded model (`LocalChatModel.bind_tools`), with the real SmolLM2-135M and
the real xgrammar grammar. Behaviour is asserted (names, arguments valid against the tool's schema,
finish reasons), never the model's exact words. Answers are kept short (max_new_tokens <= 48)."""

from __future__ import annotations

import pytest
import xgrammar as xgr
from helpers.tools import assert_calls_valid, get_time, get_weather
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from selfsteer.agents.llm.chat import LocalChatModel
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.tool_calls import (
    CALL_OPEN,
    render_tool_calls,
    split_tool_calls,
    tool_call_grammar,
    tool_spec,
)

assert convert_to_openai_tool(get_weather)["function"]["parameters"]["properties"].keys() == {"city"}


def assert_valid_calls(message: AIMessage, names: set[str]) -> None:
    assert message.content == "" and message.tool_calls, message
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert_calls_valid(message.tool_calls, names)
    assert all(call["type"] == "tool_call" for call in message.tool_calls)


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return LocalChatModel(max_new_tokens=48)


def test_required_call_names_the_tool_with_valid_args(model):
    answer = model.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Paris?")
    assert_valid_calls(answer, {"get_weather"})


def test_tool_choice_by_name_forces_that_tool(model):
    for choice in ("get_time", {"type": "function", "function": {"name": "get_time"}}):
        answer = model.bind_tools([get_weather, get_time], tool_choice=choice).invoke(
            "What is the weather in Paris?"
        )
        assert_valid_calls(answer, {"get_time"})


def test_unknown_tool_choice_is_a_value_error(model):
    with pytest.raises(ValueError, match="not one of the tools"):
        model.bind_tools([get_weather], tool_choice="get_stock_price")


def test_tool_choice_none_gives_text(model):
    answer = model.bind_tools([get_weather], tool_choice="none").invoke("Say hello.", max_new_tokens=8)
    assert answer.content and not answer.tool_calls


def test_parallel_calls_off_gives_one_call(model):
    question = "What is the weather in Paris and the time in Tokyo?"
    one = model.bind_tools([get_weather, get_time], tool_choice="required", parallel_tool_calls=False)
    assert_valid_calls(answer := one.invoke(question), {"get_weather", "get_time"})
    assert len(answer.tool_calls) == 1


def test_the_grammar_allows_several_calls_only_when_parallel():
    """The structural tag itself, through xgrammar's matcher: two calls pass with parallel calls on,
    not with them off; an unoffered tool never passes."""
    engine = get_local_engine()
    text = render_tool_calls([("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Asia/Tokyo"})])
    assert text.startswith(CALL_OPEN)
    body = text[len(CALL_OPEN) :]
    assert [c["name"] for c in split_tool_calls(body)] == ["get_weather", "get_time"]

    def accepts(parallel: bool, candidate: str) -> bool:
        spec = tool_spec([get_weather, get_time], "required", parallel)
        matcher = xgr.GrammarMatcher(engine.compile_structural_tag(tool_call_grammar(spec)))
        return matcher.accept_string(candidate) and matcher.is_completed()

    assert accepts(True, body)
    assert not accepts(False, body)
    assert accepts(False, render_tool_calls([("get_time", {"timezone": "UTC"})])[len(CALL_OPEN) :])
    assert not accepts(True, render_tool_calls([("get_stock", {"symbol": "X"})])[len(CALL_OPEN) :])


def test_tool_message_round_trip_ends_in_text(model):
    bound = model.bind_tools([get_weather], tool_choice="required")
    history = [HumanMessage("What is the weather in Paris?")]
    call = bound.invoke(history)
    assert_valid_calls(call, {"get_weather"})
    history += [
        call,
        ToolMessage(get_weather(**call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"]),
    ]
    final = model.bind_tools([get_weather], tool_choice="none").invoke(history, max_new_tokens=16)
    assert final.content and not final.tool_calls
    # The earlier call reaches the prompt as the model writes calls, the result as a tool response.
    prompt = model.engine.tokenizer.decode(model._prompt_ids(history))
    assert '<tool_call>[\n{"name": "get_weather", "arguments": {"city": ' in prompt
    assert "<tool_response>\n18 C, cloudy\n</tool_response>" in prompt
    auto = model.bind_tools([get_weather]).invoke(history, max_new_tokens=40)  # either is fine here
    assert auto.content or auto.tool_calls


def test_stream_chunks_add_up_to_the_call(model):
    chunks = list(model.bind_tools([get_weather], tool_choice="required").stream("Weather in Rome?"))
    assert len(chunks) > 2 and all(c.content == "" for c in chunks)
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert_valid_calls(total, {"get_weather"})
    assert chunks[0].tool_call_chunks[0]["name"] == "get_weather"


def test_batch_with_tools_shares_decode_steps(model):
    engine = model.engine
    before = dict(engine.stats)
    answers = model.bind_tools([get_weather], tool_choice="required").batch(
        ["Weather in Oslo?", "Weather in Lima?"]
    )
    for answer in answers:
        assert_valid_calls(answer, {"get_weather"})
    assert engine.stats["batches"] - before["batches"] == 1  # one padded batch for both


class Weather(BaseModel):
    city: str = Field(max_length=20)
    celsius: int


def test_structured_output_through_a_forced_call(model):
    runnable = model.with_structured_output(Weather, method="function_calling", include_raw=True)
    result = runnable.invoke("It is 21 degrees in Madrid.")
    assert isinstance(result["parsed"], Weather)
    assert result["raw"].tool_calls and result["raw"].tool_calls[0]["name"] == "Weather"
