"""A scripted LangChain chat model that can have tools bound.

It is scripted because it stands for a remote model that calls tools (OpenAI, vLLM, the embedded
model once it calls tools): its answer is a function of the conversation (and of the tools bound), so
each path of a loop is reached on purpose, and it records what each call was sent."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field


class ScriptedChatModel(BaseChatModel):
    """Answers with `script(messages)` or, for a script with two parameters, `script(messages, bound)`
    (`bound`: `{"tools": [...], "tool_choice": ...}` when tools are bound, else `{}`). A string answer
    is a text message; an AIMessage (e.g. with `tool_calls`) is returned as it is.

    Records every conversation (`calls`), what was bound for it (`bound`, same order) and batch sizes."""

    script: Callable[..., str | AIMessage]
    calls: list = Field(default_factory=list)
    bound: list = Field(default_factory=list)
    batches: list = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any):
        options = {"tools": [convert_to_openai_tool(tool) for tool in tools], **kwargs}
        if tool_choice is not None:
            options["tool_choice"] = tool_choice
        return self.bind(**options)

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        bound = {k: kwargs[k] for k in ("tools", "tool_choice", "temperature", "seed") if k in kwargs}
        self.calls.append(messages)
        self.bound.append(bound)
        two = len(inspect.signature(self.script).parameters) >= 2
        answer = self.script(messages, bound) if two else self.script(messages)
        message = answer if isinstance(answer, AIMessage) else AIMessage(content=answer)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def batch(self, inputs, config=None, **kwargs):
        self.batches.append(len(inputs))
        return super().batch(inputs, config, **kwargs)


def tool_calls(*calls: tuple[str, dict]) -> AIMessage:
    """An answer that calls tools: `tool_calls(("f", {"a": 1}), ...)`."""
    return AIMessage(
        content="",
        tool_calls=[
            {"name": name, "args": args, "id": f"call_{i}", "type": "tool_call"}
            for i, (name, args) in enumerate(calls)
        ],
    )
