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
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt

from selfsteer.agents.local_llm import MODEL_NAME, Generation, LocalEngine, get_local_engine

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "user", "function": "user"}


class StructuredOutputError(RuntimeError):
    """No valid object after every retry, and no fallback was given."""


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

    # -- plain generation ---------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        generation = self.engine.generate(self._prompt_ids(messages), **self._options(stop, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=_to_ai_message(generation))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        pieces: queue.Queue = queue.Queue()
        done = object()
        result: dict[str, Any] = {}

        def produce():
            try:
                result["generation"] = self.engine.generate(
                    self._prompt_ids(messages), on_text=pieces.put, **self._options(stop, **kwargs)
                )
            except BaseException as error:  # handed to the consumer below
                result["error"] = error
            finally:
                pieces.put(done)

        threading.Thread(target=produce, daemon=True).start()
        while (piece := pieces.get(timeout=self.timeout)) is not done:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        if "error" in result:
            raise result["error"]
        generation: Generation = result["generation"]
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                response_metadata={"finish_reason": generation.finish_reason, "model_name": MODEL_NAME},
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
        """All prompts in one padded `generate` (up to the engine's max batch), not one after another."""
        if config is not None and not isinstance(config, dict) and len(config) != len(inputs):
            raise ValueError("batch: one config per input, or a single config")
        try:
            prompts = [self._prompt_ids(self._convert_input(item).to_messages()) for item in inputs]
            options = self._options(kwargs.pop("stop", None), **kwargs)
            return [_to_ai_message(g) for g in self.engine.generate_many(prompts, **options)]
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

        def run(model_input: LanguageModelInput) -> Any:
            messages = self._convert_input(model_input).to_messages()
            messages = _with_format_instruction(messages, json_schema)
            raw_texts: list[str] = []
            try:
                for attempt in Retrying(
                    stop=stop_after_attempt(self.max_retries + 1),
                    retry=retry_if_exception_type(_RetryableOutput),
                    reraise=False,
                ):
                    with attempt:
                        text = self._structured_text(
                            messages, json_schema, attempt.retry_state.attempt_number - 1
                        )
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
            raw = AIMessage(
                content=raw_texts[-1] if raw_texts else "",
                response_metadata={
                    "model_name": MODEL_NAME,
                    "fallback": fell_back,
                    "attempts": len(raw_texts),
                },
            )
            return {"raw": raw, "parsed": parsed, "parsing_error": error}

        return RunnableLambda(run, name=f"LocalStructuredOutput[{json_schema.get('title', 'object')}]")

    def _structured_text(self, messages: list[BaseMessage], schema: dict, attempt: int) -> str:
        """The JSON text of one object, built field by field in the schema's order."""
        prompt_ids = self._prompt_ids(messages)
        prompt_text = self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        sampling = (
            {"temperature": 0.0} if attempt == 0 else {"temperature": 0.8, "seed": (self.seed or 0) + attempt}
        )
        text = "{"
        for index, (name, field_schema) in enumerate(schema.get("properties", {}).items()):
            # The value starts with a space, as the model tokenizes JSON: `"key":` then ` "value"`.
            text += (", " if index else "") + json.dumps(name) + ":"
            choices = _choices(field_schema, schema)
            if choices is not None:
                options = [" " + json.dumps(choice) for choice in choices]
                scores = self.engine.score_options(prompt_text + text, options, timeout=self.timeout)
                text += options[max(range(len(options)), key=scores.__getitem__)]
                continue
            value_schema = dict(field_schema)
            if "$defs" in schema:
                value_schema["$defs"] = schema["$defs"]
            budget = self.field_max_tokens
            if value_schema.get("type") == "string" and "enum" not in value_schema:
                # Every token holds at least one character: the space and two quotes, plus at most
                # field_max_chars tokens, always fit.
                value_schema["maxLength"] = min(
                    value_schema.get("maxLength", self.field_max_chars), self.field_max_chars
                )
                budget = value_schema["maxLength"] + 3
            generation = self.engine.generate(
                prompt_ids + self.engine.tokenizer.encode(text, add_special_tokens=False),
                max_new_tokens=budget,
                grammar=self.engine.compile_json_schema(value_schema, leading_space=True),
                timeout=self.timeout,
                **sampling,
            )
            if generation.finish_reason != "stop":
                raise _RetryableOutput(f"field {name!r} ran past {budget} tokens")
            text += generation.text
        return text + "}"


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
        content = f"Tool result: {content}"
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


def _to_ai_message(generation: Generation) -> AIMessage:
    return AIMessage(
        content=generation.text,
        response_metadata={"finish_reason": generation.finish_reason, "model_name": MODEL_NAME},
        usage_metadata=_usage(generation),
    )
