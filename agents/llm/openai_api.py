"""The OpenAI chat-completions API's types, as `selfsteer serve-llm` speaks it (agents/llm/openai_server.py):
the request a client sends, the answers and stream chunks it gets, and the error body. One model per
concept, shared by the server's validation and its OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
OPENAI_MAX_STOP = 4  # OpenAI takes at most four stop sequences


# ----------------------------------------------------------------------------------------------------
# Request models. Unknown fields are ignored (clients send newer options such as `user` or
# `metadata`); options that would change the answer and that we cannot honour are refused with 400.


# strict: JSON types as the schema says them (`0` is no boolean, `"1"` no number); a float field
# still takes an integer.
_REQUEST = ConfigDict(extra="ignore", strict=True)


def _integral(value):
    """JSON Schema's integer is any number without a fraction: 2.0 is one."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


JsonInt = Annotated[int, BeforeValidator(_integral)]
TokenCount = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


class TextPart(BaseModel):
    model_config = _REQUEST

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _REQUEST

    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(BaseModel):
    model_config = _REQUEST

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _REQUEST

    # "developer" is OpenAI's newer name for the system role; "tool" carries a tool's result.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="an assistant's earlier calls")
    tool_call_id: str | None = Field(default=None, description="the call a tool message answers")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = "response"
    # `schema` would shadow a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _REQUEST

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = _REQUEST

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = _REQUEST

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _REQUEST

    name: str


class NamedToolChoice(BaseModel):
    model_config = _REQUEST

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = _REQUEST

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _REQUEST

    model: str = DEFAULT_MODEL_NAME
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: JsonInt | None = Field(
        default=None, ge=1, description="at most the server's cap (`selfsteer serve-llm --max-tokens`)"
    )
    max_completion_tokens: JsonInt | None = Field(
        default=None, ge=1, description="a newer name of max_tokens"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: JsonInt | None = None
    stop: str | Annotated[list[str], Field(max_length=OPENAI_MAX_STOP)] | None = Field(
        default=None, description="up to 4 stop sequences"
    )
    n: JsonInt = Field(default=1, ge=1, json_schema_extra={"maximum": 1}, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="unknown tool name: 400"
    )
    parallel_tool_calls: bool | None = None
    # Declared only to refuse it clearly: this model returns no logprobs.
    logprobs: bool | None = Field(
        default=None, json_schema_extra={"enum": [False, None]}, description="not supported"
    )


def request_model(max_tokens_cap: int) -> type[ChatCompletionRequest]:
    """The request model of an app, its OpenAPI schema naming the app's cap as the maximum of
    max_tokens (the check itself is a 400 in `_engine_options`, in OpenAI's words)."""
    cap = {"maximum": max_tokens_cap}
    return create_model(
        "ChatCompletionRequest",
        __base__=ChatCompletionRequest,
        max_tokens=(
            TokenCount | None,
            Field(default=None, json_schema_extra=cap, description=f"at most {max_tokens_cap}"),
        ),
        max_completion_tokens=(
            TokenCount | None,
            Field(default=None, json_schema_extra=cap, description="a newer name of max_tokens"),
        ),
    )


# Response models: what the server answers, for the OpenAPI document (and checked on the way out).


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (the last one, asked for with
    stream_options.include_usage, has no choices and the usage)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# A streamed answer, event by event: `data:` holds a chunk, an error (the stream's headers were sent
# before it happened), or the final `[DONE]`.
STREAM_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/ChatCompletionChunk"},
                            {"$ref": "#/components/schemas/ErrorResponse"},
                        ]
                    },
                },
            ]
        },
    },
}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def error_responses(*statuses: int) -> dict[int | str, dict]:
    described = {
        400: "a request this server cannot serve: an unsupported option, max_tokens above the cap, an "
        "invalid JSON schema (response_format or tools), a tool_choice naming no tool, a prompt longer than the context, a body that is not JSON",
        401: "missing or wrong API key (`Authorization: Bearer KEY`)",
        413: "the request body is too large",
        422: "a request that does not match this schema",
        503: "the server is shutting down",
        504: "the model did not answer within the server's timeout",
    }
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}
