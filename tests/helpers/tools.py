"""The two tools the tool-calling tests offer (in process and through serve-llm), and the check that a
call names one of them and that its arguments validate against that tool's parameters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "18 C, cloudy"


def get_time(timezone: str) -> str:
    """Get the current time in a timezone."""
    return "12:00"


class WeatherArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    city: str


class TimeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    timezone: str


# The tools' parameters, as pydantic models that validate a call's arguments against them.
ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}


def assert_calls_valid(calls: list[dict], names: set[str]) -> None:
    """LangChain tool calls (`name`, `args`, `id`): at least one, each of an offered tool, with an
    OpenAI-style id and arguments its schema accepts."""
    assert calls
    for call in calls:
        assert call["name"] in names and call["id"].startswith("call_")
        ARGS[call["name"]].model_validate(call["args"])
