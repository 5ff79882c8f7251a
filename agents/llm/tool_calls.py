"""Tool (function) calling of the embedded model, shared by `LocalChatModel.bind_tools` (`chat`) and
serve-llm's `tools` (`openai_server`): the tools offered in the system prompt, the calls' grammar, the
choice between a call and a text answer (`plan_tool_answer`), and the calls read back from the text,
also while it streams (`split_tool_calls`, `CallStream`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages.tool import tool_call_chunk

from selfsteer.agents.llm.engine import LocalEngine

# The format is the one SmolLM2-Instruct's tool-calling data uses (its chat template has none; the
# Ollama template of SmolLM2 spells it out): the tools as JSON in the system prompt between <tools>
# and </tools>, a call as `<tool_call>[\n{"name": ..., "arguments": {...}}\n]</tool_call>` (several
# calls separated by ",\n"), a tool's result as a user turn `<tool_response>\n...\n</tool_response>`.
# A call is decoded under an xgrammar structural tag built from the tools' JSON schemas: each call
# names an offered tool and its arguments match that tool's parameters, by construction.
#
# tool_choice "auto": the 135M model was not trained on this format well enough to start a call on
# its own (greedy, it answers in prose even when a tool obviously fits: measured), so "auto" is a
# scored choice: the answer is a call when the log-probability that it starts with `<tool_call>` is
# at least AUTO_CALL_MIN_LOGPROB. Measured on the first 40 BFCL questions of `multiple` (should call)
# and `irrelevance` (should not): 26 of 40 and 7 of 40 call at -8.0 (74% right); "What is the weather
# in Paris?" -6.8 (calls), "Hi! How are you today?" -9.2, "Write a haiku" -12.7 (answer). After a
# tool result it tends to call again (-6.3 measured): cap the rounds (ToolSupervisor does).

CALL_OPEN = "<tool_call>[\n"
CALL_SEPARATOR = ",\n"
CALL_CLOSE = "\n]</tool_call>"
AUTO_CALL_MIN_LOGPROB = -8.0
CALL_START = "<tool_call>"  # what "auto" scores
TOOLS_PROMPT = (
    "You are an expert in composing functions. You have access to the following tools:\n"
    "<tools>{tools}</tools>\n"
    "To call tools, answer only with:\n"
    '<tool_call>[\n{{"name": "func_name", "arguments": {{"argument1": "value1"}}}}\n]</tool_call>'
)
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass
class ToolSpec:
    """What a request asks of tool calling: the offered functions (name, description, parameters),
    tool_choice ("none", "auto", "required" or a tool name) and whether several calls are allowed."""

    functions: list[dict]
    choice: str = "auto"
    parallel: bool = True

    @property
    def names(self) -> list[str]:
        return [f["name"] for f in self.functions]


def tool_spec(tools: Sequence[Any] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = None):
    """A `ToolSpec` from LangChain's or OpenAI's arguments (tools: OpenAI tool dicts, pydantic
    models, functions or BaseTools); None when there are no tools (tool_choice is then ignored).
    ValueError for a tool_choice that names no offered tool, or a tool name that is not
    `[A-Za-z0-9_.-]{1,64}`."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    if not tools:  # a tool_choice without tools has nothing to choose: ignored
        return None
    functions, seen = [], set()
    for tool in tools:
        function = convert_to_openai_tool(tool)["function"]
        name = function.get("name", "")
        if not _TOOL_NAME.match(name):
            raise ValueError(f"tool name {name!r}: letters, digits, '_', '-' and '.' only, at most 64")
        if name in seen:  # a tool offered twice under one name: the first definition counts
            continue
        seen.add(name)
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        functions.append(
            {"name": name, "description": function.get("description") or "", "parameters": parameters}
        )
    names = [f["name"] for f in functions]
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": X}}, or {"name": X}
        tool_choice = (tool_choice.get("function") or tool_choice).get("name")
    if tool_choice is None or tool_choice is True:
        tool_choice = "auto" if tool_choice is None else "required"
    if tool_choice == "any":
        tool_choice = "required"
    if tool_choice not in ("none", "auto", "required") and tool_choice not in names:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of the tools {names}")
    return ToolSpec(functions, tool_choice, parallel_tool_calls is not False)


def _without_titles(schema: Any) -> Any:
    """The schema without pydantic's `title`s (tokens the model does not need); a property named
    "title" stays."""
    if isinstance(schema, dict):
        return {
            k: (
                {name: _without_titles(v) for name, v in value.items()}
                if k in ("properties", "$defs", "definitions") and isinstance(value, dict)
                else _without_titles(value)
            )
            for k, value in schema.items()
            if k != "title"
        }
    if isinstance(schema, list):
        return [_without_titles(v) for v in schema]
    return schema


def tools_system_prompt(spec: ToolSpec, system: str = "") -> str:
    """The system prompt that lists the tools (compact JSON), after the conversation's own one."""
    listed = [
        _without_titles(f)
        if f["description"]
        else _without_titles({"name": f["name"], "parameters": f["parameters"]})
        for f in spec.functions
    ]
    prompt = TOOLS_PROMPT.format(tools=json.dumps(listed, ensure_ascii=False))
    return f"{system}\n\n{prompt}" if system else prompt


def render_tool_calls(calls: Sequence[tuple[str, Any]], content: str = "") -> str:
    """An assistant turn that called tools, as the model writes it: (name, arguments) pairs, the
    arguments a dict or their JSON text."""
    items = [
        json.dumps({"name": name}, ensure_ascii=False)[:-1]
        + ', "arguments": '
        + (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        + "}"
        for name, args in calls
    ]
    text = CALL_OPEN + CALL_SEPARATOR.join(items) + CALL_CLOSE
    return f"{content}\n{text}" if content else text


def render_tool_result(content: str) -> str:
    """A tool's result, as the user turn the model was shown them in."""
    return f"<tool_response>\n{content}\n</tool_response>"


def tool_call_grammar(spec: ToolSpec) -> dict:
    """The xgrammar structural tag of the calls after CALL_OPEN: one or more (one only when parallel
    calls are off) `{"name": N, "arguments": ARGS}` of the offered (or the chosen) tools, then
    CALL_CLOSE."""
    functions = [f for f in spec.functions if spec.choice in ("auto", "required") or f["name"] == spec.choice]
    tags = [
        {
            "type": "tag",
            "begin": json.dumps({"name": f["name"]}, ensure_ascii=False)[:-1] + ', "arguments": ',
            "content": {"type": "json_schema", "json_schema": f["parameters"]},
            "end": "}",
        }
        for f in functions
    ]
    calls = {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": CALL_SEPARATOR,
        "at_least_one": True,
        "stop_after_first": not spec.parallel,
    }
    sequence = {"type": "sequence", "elements": [calls, {"type": "const_string", "value": CALL_CLOSE}]}
    return {"type": "structural_tag", "format": sequence}


def plan_tool_answer(engine: LocalEngine, chat: list[dict], spec: ToolSpec, timeout: float | None = None):
    """(prompt ids, grammar): the prompt of the answer and, when it is to be a call, its grammar
    (the prompt then ends with CALL_OPEN, and the generated text is the rest of the call); grammar
    None: a text answer, whose prompt is the conversation without the tool list (the small model
    answers better without it)."""
    if spec.choice == "none":
        return engine.chat_prompt_ids(chat), None
    has_system = bool(chat) and chat[0]["role"] == "system"
    system, rest = (chat[0]["content"], chat[1:]) if has_system else ("", chat)
    tool_chat = [{"role": "system", "content": tools_system_prompt(spec, system)}, *rest]
    prompt_ids = engine.chat_prompt_ids(tool_chat)
    if spec.choice == "auto":
        prompt_text = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        (logprob,) = engine.score_options(prompt_text, [CALL_START], timeout=timeout)
        if logprob < AUTO_CALL_MIN_LOGPROB:
            return engine.chat_prompt_ids(chat), None
    grammar = engine.compile_structural_tag(tool_call_grammar(spec))
    return prompt_ids + engine.tokenizer.encode(CALL_OPEN, add_special_tokens=False), grammar


def split_tool_calls(text: str) -> list[dict]:
    """The calls in a call's text after CALL_OPEN, also while it is being written (streaming) or
    when it was cut off: `{"name", "arguments" (JSON text, maybe partial), "complete"}` for every
    call whose name is complete."""
    calls, at = [], 0
    while True:
        if text.startswith(CALL_SEPARATOR, at):
            at += len(CALL_SEPARATOR)
        head = '{"name": "'
        if not text.startswith(head, at):
            return calls
        end_of_name = text.find('", "arguments": ', at + len(head))
        if end_of_name < 0:
            return calls
        name = json.loads(text[at + len(head) - 1 : end_of_name + 1])
        start = end_of_name + len('", "arguments": ')
        end = _end_of_json_value(text, start)
        arguments = text[start : len(text) if end is None else end]
        calls.append({"name": name, "arguments": arguments, "complete": end is not None})
        if end is None:
            return calls
        at = end + 1  # past the call's closing "}"


def _end_of_json_value(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at `start` ends (just past it), or None if it does
    not end in `text`."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class CallStream:
    """Turns a call's text, piece by piece, into LangChain tool-call chunks: a call's name and id
    once its name is complete, then pieces of its arguments (serve-llm streams the same way)."""

    def __init__(self):
        self.text = ""
        self.sent: list[dict] = []  # per call: its id, and the arguments sent so far

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        merged: dict[int, dict] = {}  # one chunk per call
        for index, call_id, name, args in self.deltas():
            if index in merged:
                merged[index]["args"] += args
            else:
                merged[index] = tool_call_chunk(name=name, args=args, id=call_id, index=index)
        return list(merged.values())

    def deltas(self) -> list[tuple[int, str | None, str | None, str]]:
        """(index, id or None, name or None, new arguments text) of what is new since the last call."""
        out = []
        for index, call in enumerate(split_tool_calls(self.text)):
            if index == len(self.sent):
                self.sent.append({"id": new_call_id(), "arguments": ""})
                out.append((index, self.sent[index]["id"], call["name"], ""))
            new = call["arguments"][len(self.sent[index]["arguments"]) :]
            if new:
                self.sent[index]["arguments"] = call["arguments"]
                out.append((index, None, None, new))
        return out
