"""`LocalChatModel`: the embedded model as a LangChain chat model.

Everything a LangChain user expects (`invoke`, `stream`, `batch`, `ainvoke`, callbacks), plus
`with_structured_output(Schema)` that always returns a valid instance:

* enum / `Literal` / boolean fields are a constrained choice: every option is scored by the model
  (log-probability of its JSON text after the object so far) and the best one is taken;
* every other field is generated under a JSON-schema grammar (xgrammar), so it parses by construction;
* whatever still fails (a value cut off by the token budget, a custom pydantic validator) is retried
  with tenacity, sampling on the retries; then the documented fallback is returned, or
  `StructuredOutputError` raised when there is none.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import invalid_tool_call, tool_call
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt

from selfsteer.agents.decision import StructuredOutputError
from selfsteer.agents.llm.engine import Generation, LocalEngine
from selfsteer.agents.llm.local_engines import get_local_engine
from selfsteer.agents.llm.tool_calls import (
    CallStream,
    new_call_id,
    plan_tool_answer,
    render_tool_calls,
    render_tool_result,
    split_tool_calls,
    tool_spec,
)
from selfsteer.agents.llm.weights import MODEL_NAME

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "user", "function": "user"}


class _RetryableOutput(ValueError):
    """An answer that did not validate (cut off, or refused by a validator): worth another try."""


class LocalChatModel(BaseChatModel):
    """SmolLM2-135M-Instruct running in this process (CPU), shared by all instances and threads.

    Args:
        max_new_tokens: the most tokens one answer may have.
        temperature: 0 is greedy (deterministic); above 0 samples.
        top_p: nucleus sampling when temperature > 0.
        seed: seeds sampling, so sampled answers are reproducible.
        max_retries: structured output's retries after the first try.
        field_max_tokens: the token budget of one non-string field (number, list, object) in
            structured output; an answer cut off by it is retried.
        field_max_chars: the longest top-level string field in structured output. The grammar closes
            the string by then and the token budget covers that many characters, so a string answer
            is never cut off.
        timeout: seconds to wait for one answer before raising TimeoutError.
        adapter: a LoRA adapter folder merged into the model at load (e.g. the shipped intervener,
            `selfsteer.agents.intervener.ADAPTER_DIR`); None is the plain embedded model.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_retries: int = 2
    field_max_tokens: int = 160
    field_max_chars: int = 400
    timeout: float = 300.0
    adapter: str | None = None
    _engine: LocalEngine | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "selfsteer-local"

    @property
    def model_name(self) -> str:
        return MODEL_NAME if self.adapter is None else f"{MODEL_NAME}+{Path(self.adapter).name}"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": MODEL_NAME, "temperature": self.temperature, "max_new_tokens": self.max_new_tokens}

    @property
    def engine(self) -> LocalEngine:
        if self._engine is None:
            self._engine = get_local_engine(self.adapter)
        return self._engine

    # -- prompts ------------------------------------------------------------------------------------

    def _prompt_ids(self, messages: Sequence[BaseMessage]) -> list[int]:
        return self.engine.chat_prompt_ids([_to_chat_dict(m) for m in messages])

    def _options(self, stop: list[str] | None, **kwargs) -> dict:
        return {
            "max_new_tokens": kwargs.get("max_new_tokens", self.max_new_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "seed": kwargs.get("seed", self.seed),
            "json_schema": kwargs.get("json_schema"),
            "stop": stop,
            "timeout": self.timeout,
        }

    # -- generation ---------------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with these tools offered (OpenAI tool dicts, pydantic models, functions or
        BaseTools). tool_choice: "auto"/None (the model decides, see AUTO_CALL_MIN_LOGPROB), "none"
        (text), "required"/"any"/True (at least one call), a tool name or
        `{"type": "function", "function": {"name": X}}` (a call of X). parallel_tool_calls=False:
        at most one call per answer. A call is decoded under a grammar of the tools' JSON schemas, so
        it names an offered tool and its arguments match that tool's parameters."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        openai_tools = [convert_to_openai_tool(tool) for tool in tools]
        tool_spec(openai_tools, tool_choice, parallel_tool_calls)  # unknown tool_choice: ValueError now
        return self.bind(
            tools=openai_tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **kwargs
        )

    def _prepare(self, messages: Sequence[BaseMessage], stop: list[str] | None, kwargs: dict):
        """(prompt ids, engine options, whether the answer is a tool call) for one conversation."""
        options = self._options(stop, **kwargs)
        chat = [_to_chat_dict(m) for m in messages]
        spec = tool_spec(kwargs.get("tools"), kwargs.get("tool_choice"), kwargs.get("parallel_tool_calls"))
        if spec is None:
            return self.engine.chat_prompt_ids(chat), options, False
        prompt_ids, grammar = plan_tool_answer(self.engine, chat, spec, timeout=self.timeout)
        if grammar is not None:  # a call: its grammar, and no stop string may cut it
            options.update(grammar=grammar, json_schema=None, stop=None)
        return prompt_ids, options, grammar is not None

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt_ids, options, is_call = self._prepare(messages, stop, kwargs)
        generation = self.engine.generate(prompt_ids, **options)
        return ChatResult(generations=[ChatGeneration(message=_to_ai_message(generation, is_call))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        prompt_ids, options, is_call = self._prepare(messages, stop, kwargs)
        pieces: queue.Queue = queue.Queue()
        done = object()
        result: dict[str, Any] = {}

        def produce():
            try:
                result["generation"] = self.engine.generate(prompt_ids, on_text=pieces.put, **options)
            except BaseException as error:  # handed to the consumer below
                result["error"] = error
            finally:
                pieces.put(done)

        threading.Thread(target=produce, daemon=True).start()
        calls = CallStream()
        while (piece := pieces.get(timeout=self.timeout)) is not done:
            if is_call:  # the calls' names and ids, then pieces of their arguments
                chunks = calls.feed(piece)
                if not chunks:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=chunks))
            else:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        if "error" in result:
            raise result["error"]
        generation: Generation = result["generation"]
        last = _to_ai_message(generation, is_call)
        rest = generation.text[len(calls.text) :] if generation.text.startswith(calls.text) else ""
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                tool_call_chunks=calls.feed(rest) if is_call else [],
                response_metadata=last.response_metadata,
                usage_metadata=_usage(generation),
                chunk_position="last",
            )
        )

    def batch(
        self,
        inputs: list[LanguageModelInput],
        config: RunnableConfig | list[RunnableConfig] | None = None,
        *,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> list[BaseMessage]:
        """All prompts decoded together (up to the engine's max batch), not one after another; with
        tools, the calls (each under its grammar) and the text answers share the same decode steps."""
        if config is not None and not isinstance(config, dict) and len(config) != len(inputs):
            raise ValueError("batch: one config per input, or a single config")
        try:
            stop = kwargs.pop("stop", None)
            prepared = [self._prepare(self._convert_input(i).to_messages(), stop, kwargs) for i in inputs]
            if not any(is_call for _, _, is_call in prepared):
                options = prepared[0][1] if prepared else self._options(stop, **kwargs)
                return [
                    _to_ai_message(g) for g in self.engine.generate_many([p[0] for p in prepared], **options)
                ]
            futures = []
            try:  # submitted together: they join the same decode steps
                for ids, options, _ in prepared:
                    futures.append(
                        self.engine.submit(ids, **{k: v for k, v in options.items() if k != "timeout"})
                    )
                generations = [f.result(timeout=self.timeout) for f in futures]
            finally:
                for future in futures:
                    future.cancel()
            return [_to_ai_message(g, p[2]) for g, p in zip(generations, prepared, strict=True)]
        except Exception as error:
            if not return_exceptions:
                raise
            return [error for _ in inputs]

    # -- structured output --------------------------------------------------------------------------

    def with_structured_output(
        self,
        schema: type[BaseModel] | dict,
        *,
        include_raw: bool = False,
        fallback: Any = None,
        **kwargs: Any,
    ) -> Runnable:
        """A runnable whose output is always an instance of `schema` (a pydantic model; a JSON-schema
        dict gives a dict).

        fallback: what to return when every try failed: an instance (or dict), or a callable taking
            the last error and returning one. Without a fallback, `StructuredOutputError` is raised.
            Supervisors pass their safe action here (e.g. "keep the learning rate").
        include_raw: return `{"raw": AIMessage, "parsed": obj, "parsing_error": error or None}`;
            `raw.response_metadata["fallback"]` says whether the fallback was used.
        """
        if kwargs.get("method") not in (None, "json_schema", "json_mode", "function_calling"):
            raise ValueError(f"unknown structured-output method {kwargs['method']!r}")
        is_model = isinstance(schema, type) and issubclass(schema, BaseModel)
        json_schema = schema.model_json_schema() if is_model else dict(schema)
        if json_schema.get("type") != "object" and "properties" not in json_schema:
            raise ValueError(
                "with_structured_output needs an object schema (a pydantic model or a JSON-schema dict)"
            )

        def parse(text: str):
            try:
                return schema.model_validate_json(text) if is_model else json.loads(text)
            except (ValidationError, json.JSONDecodeError) as error:
                raise _RetryableOutput(str(error)) from error

        # method="function_calling": one forced call of a tool whose parameters are the schema (the
        # tools prompt lists its fields). Otherwise field by field: choices scored, the rest under a
        # grammar. Both always give a valid instance (or the fallback).
        by_call = kwargs.get("method") == "function_calling"
        calls: list[AIMessage] = []

        def run(model_input: LanguageModelInput) -> Any:
            messages = self._convert_input(model_input).to_messages()
            if not by_call:
                messages = _with_format_instruction(messages, json_schema)
            raw_texts: list[str] = []
            calls.clear()
            try:
                for attempt in Retrying(
                    stop=stop_after_attempt(self.max_retries + 1),
                    retry=retry_if_exception_type(_RetryableOutput),
                    reraise=False,
                ):
                    with attempt:
                        number = attempt.retry_state.attempt_number - 1
                        if by_call:
                            text = self._structured_call_text(messages, json_schema, number, calls)
                        else:
                            text = self._structured_text(messages, json_schema, number)
                        raw_texts.append(text)
                        parsed = parse(text)
                error = None
                fell_back = False
            except RetryError as retry_error:
                error = retry_error.last_attempt.exception()
                if fallback is None:
                    raise StructuredOutputError(
                        f"the model gave no valid {json_schema.get('title', 'object')} in "
                        f"{self.max_retries + 1} tries (last error: {error}); pass fallback= to get a safe default"
                    ) from error
                parsed = fallback(error) if callable(fallback) else fallback
                fell_back = True
            if not include_raw:
                return parsed
            metadata = {"model_name": MODEL_NAME, "fallback": fell_back, "attempts": len(raw_texts)}
            if calls:  # the tool-call message itself, as other chat models return it
                raw = calls[-1].model_copy(
                    update={"response_metadata": {**calls[-1].response_metadata, **metadata}}
                )
            else:
                raw = AIMessage(content=raw_texts[-1] if raw_texts else "", response_metadata=metadata)
            return {"raw": raw, "parsed": parsed, "parsing_error": error}

        return RunnableLambda(run, name=f"LocalStructuredOutput[{json_schema.get('title', 'object')}]")

    def _structured_call_text(
        self, messages: list[BaseMessage], schema: dict, attempt: int, calls: list[AIMessage]
    ) -> str:
        """The JSON text of one object, as the arguments of a forced call of a tool named after the
        schema whose parameters are the schema."""
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", str(schema.get("title") or "response"))[:64]
        tool = {
            "type": "function",
            "function": {"name": name, "description": schema.get("description", ""), "parameters": schema},
        }
        sampling = (
            {"temperature": 0.0} if attempt == 0 else {"temperature": 0.8, "seed": (self.seed or 0) + attempt}
        )
        message = self.bind_tools([tool], tool_choice=name, parallel_tool_calls=False).invoke(
            messages, **sampling
        )
        calls.append(message)
        if not message.tool_calls:
            raise _RetryableOutput(f"the call ran past {self.max_new_tokens} tokens")
        return json.dumps(message.tool_calls[0]["args"])

    def _structured_text(self, messages: list[BaseMessage], schema: dict, attempt: int) -> str:
        """The JSON text of one object, built field by field in the schema's order."""
        sampling = (
            {"temperature": 0.0} if attempt == 0 else {"temperature": 0.8, "seed": (self.seed or 0) + attempt}
        )
        return structured_json_text(
            self.engine,
            self._prompt_ids(messages),
            schema,
            field_max_chars=self.field_max_chars,
            field_max_tokens=self.field_max_tokens,
            timeout=self.timeout,
            **sampling,
        )


def structured_json_text(
    engine: LocalEngine,
    prompt_ids: list[int],
    schema: dict,
    *,
    field_max_chars: int,
    field_max_tokens: int,
    max_tokens: int | None = None,
    timeout: float | None = None,
    cancel: Future | None = None,
    **sampling,
) -> str:
    """The JSON text of one object of `schema` answering the prompt, built field by field in the
    schema's order: a field with a finite set of values takes the one of highest log-probability
    (scored whole, not decided by its first token), any other is generated under its own grammar
    (`sampling`: temperature, seed). Raises _RetryableOutput when a field runs past its budget, or
    the generated fields together past `max_tokens`. Used by the local chat model and by serve-llm,
    so that both answer the same prompt the same way.

    cancel: once this future is done (its caller no longer wants the answer), the field being
    generated is cancelled in the engine and CancelledError raised (at the latest before the next
    field)."""
    prompt_text = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    text = "{"
    left = max_tokens
    for index, (name, field_schema) in enumerate(schema.get("properties", {}).items()):
        if cancel is not None and cancel.done():
            raise CancelledError("the answer was cancelled")
        # The value starts with a space, as the model tokenizes JSON: `"key":` then ` "value"`.
        text += (", " if index else "") + json.dumps(name) + ":"
        choices = _choices(field_schema, schema)
        if choices is not None:
            text += " " + json.dumps(best_choice(engine, prompt_text + text, name, choices, timeout=timeout))
            continue
        value_schema = dict(field_schema)
        if "$defs" in schema:
            value_schema["$defs"] = schema["$defs"]
        budget = field_max_tokens
        if value_schema.get("type") == "string" and "enum" not in value_schema:
            # Every token holds at least one character: the space and two quotes, plus at most
            # field_max_chars tokens, always fit.
            value_schema["maxLength"] = min(value_schema.get("maxLength", field_max_chars), field_max_chars)
            budget = value_schema["maxLength"] + 3
            if value_schema["maxLength"] == 0:  # nothing to generate: not worth a pass over the prompt
                text += ' ""'
                continue
        if left is not None:
            if left < 1:
                raise _RetryableOutput(f"the fields before {name!r} took all {max_tokens} tokens")
            budget = min(budget, left)
        future = engine.submit(
            prompt_ids + engine.tokenizer.encode(text, add_special_tokens=False),
            max_new_tokens=budget,
            grammar=engine.compile_json_schema(value_schema, leading_space=True),
            **sampling,
        )
        if cancel is not None:  # runs at once if it is done already
            cancel.add_done_callback(lambda _, future=future: future.cancel())
        try:
            generation = future.result(timeout=timeout)
        finally:  # a timeout, an error or an interrupt: nothing keeps generating for nobody
            future.cancel()
        if left is not None:
            left -= len(generation.token_ids)
        if generation.finish_reason != "stop":
            raise _RetryableOutput(f"field {name!r} ran past {budget} tokens")
        text += generation.text
    return text + "}"


def best_choice(
    engine: LocalEngine, prefix_text: str, name: str, choices: list, timeout: float | None = None
):
    """The value of highest log-probability after `prefix_text` (which ends with the field's key),
    each scored whole, plus the engine's choice bias for this field (an adapter's calibration)."""
    options = [" " + json.dumps(choice) for choice in choices]
    scores = engine.score_options(prefix_text, options, timeout=timeout)
    bias = engine.choice_bias.get(name, {})
    scores = [score + bias.get(str(choice), 0.0) for score, choice in zip(scores, choices, strict=True)]
    return choices[max(range(len(choices)), key=scores.__getitem__)]


def _choices(field_schema: dict, root: dict) -> list | None:
    """The finite set of values a field may take (enum, const, Literal, bool), or None."""
    if "$ref" in field_schema:  # an Enum class lives in $defs
        field_schema = root.get("$defs", {}).get(field_schema["$ref"].rsplit("/", 1)[-1], {})
    if "enum" in field_schema:
        return list(field_schema["enum"])
    if "const" in field_schema:
        return [field_schema["const"]]
    if field_schema.get("type") == "boolean":
        return [True, False]
    return None


def _with_format_instruction(messages: list[BaseMessage], schema: dict) -> list[BaseMessage]:
    """Tell the model which fields to fill, compactly (every prompt token costs latency on a CPU)."""
    from langchain_core.messages import SystemMessage

    lines = ["Answer with a JSON object with these fields:"]
    for name, field_schema in schema.get("properties", {}).items():
        choices = _choices(field_schema, schema)
        kind = " | ".join(json.dumps(c) for c in choices) if choices else field_schema.get("type", "value")
        description = field_schema.get("description", "")
        lines.append(f'- "{name}": {kind}' + (f" ({description})" if description else ""))
    instruction = "\n".join(lines)
    if messages and messages[0].type == "system":
        return [SystemMessage(content=f"{messages[0].content}\n\n{instruction}"), *messages[1:]]
    return [SystemMessage(content=instruction), *messages]


def _to_chat_dict(message: BaseMessage) -> dict:
    role = getattr(message, "role", None) or _ROLES.get(message.type, "user")
    content = message.content if isinstance(message.content, str) else _text_of(message.content)
    if message.type == "tool":
        content = render_tool_result(content)
    elif message.type == "ai" and getattr(message, "tool_calls", None):
        content = render_tool_calls([(c["name"], c["args"]) for c in message.tool_calls], content)
    return {"role": role, "content": content}


def _text_of(content: list) -> str:
    return "".join(part if isinstance(part, str) else part.get("text", "") for part in content)


def _usage(generation: Generation) -> dict:
    output = len(generation.token_ids)
    return {
        "input_tokens": generation.prompt_tokens,
        "output_tokens": output,
        "total_tokens": generation.prompt_tokens + output,
    }


def _to_ai_message(generation: Generation, is_call: bool = False) -> AIMessage:
    """The answer as an AIMessage; a call's text becomes `tool_calls` (a call cut off by the token
    budget: `invalid_tool_calls`), finish_reason "tool_calls" (or "length")."""
    metadata = {"finish_reason": generation.finish_reason, "model_name": MODEL_NAME}
    if not is_call:
        return AIMessage(
            content=generation.text, response_metadata=metadata, usage_metadata=_usage(generation)
        )
    calls, invalid = [], []
    for call in split_tool_calls(generation.text):
        if call["complete"]:
            calls.append(tool_call(name=call["name"], args=json.loads(call["arguments"]), id=new_call_id()))
        else:
            invalid.append(
                invalid_tool_call(
                    name=call["name"],
                    args=call["arguments"],
                    id=new_call_id(),
                    error="cut off by max_new_tokens",
                )
            )
    if generation.finish_reason == "stop":
        metadata["finish_reason"] = "tool_calls"
    return AIMessage(
        content="",
        tool_calls=calls,
        invalid_tool_calls=invalid,
        response_metadata=metadata,
        usage_metadata=_usage(generation),
    )
