"""The records every layer shares: one pydantic model per concept (a run, a metric point, a command, a
checkpoint, a branch, a decision, a reflect episode), used by the store, the control server's responses, the client, the
graphs and the exports. The dashboard's TypeScript types are generated from the OpenAPI these make.

The lowest layer owns them (trainer_bridge knows nothing of LangGraph), so every layer may import them.
A record declares what goes out: a row's other columns (a run's config, a decision's observation) stay
with the one row they belong to (`RunDetail`, `NewDecision`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    field_validator,
)

# What a supervisor may do with the learning rate.
Action = Literal["double", "halve", "keep"]
ACTIONS: tuple[str, ...] = get_args(Action)

# A run's life: created, running (paused while a pause command holds it), then one of the finished phases.
Phase = Literal["created", "running", "paused", "finished", "stopped", "failed"]
FINISHED_PHASES: tuple[str, ...] = ("finished", "stopped", "failed")

# A command's life in the journal.
CommandStatus = Literal["pending", "running", "success", "failed"]
COMMAND_STATUSES: tuple[str, ...] = get_args(CommandStatus)


def json_number(value: float | None) -> float | None:
    """A number for JSON, which has no NaN or Infinity: those become null."""
    return value if value is not None and math.isfinite(value) else None


def finite_or_null(value: Any) -> Any:
    """The value with every NaN or infinite float inside it (dicts, lists, tuples) replaced by None: the one
    way a non-finite number is persisted as JSON (the API, the journal, collected rows, results files).
    Its readers take null back as not finite (a metric's NaN, a diverged branch's outcome)."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, Mapping):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """`value` as strict JSON text (`finite_or_null`: no NaN or Infinity tokens): a line of a .jsonl file
    without `indent`, a .json file with it; `default` as `json.dumps` takes it. Every JSON file selfsteer
    writes for a reader goes through it."""
    return json.dumps(finite_or_null(value), indent=indent, default=default, allow_nan=False)


def _no_text_or_bool(value: Any) -> Any:
    """JSON's number: 2.0 is an integer there, but "2" and true are not numbers."""
    if isinstance(value, str | bool):
        raise ValueError("must be a number, not text or a boolean")
    return value


# An integer as JSON Schema has it (2.0 counts, "2" does not).
Integer = Annotated[int, BeforeValidator(_no_text_or_bool)]
# The largest step or id: it fits a JavaScript number (and SQLite's 64-bit integers, which a larger one
# overflows: a 500 the API fuzzer found through `retry_of`).
MAX_INT = 2**53 - 1
# A row's id (1 and up). The bounds before the validator: after it, pydantic writes them into the JSON
# schema of an optional field as `ge`/`le`, which no JSON Schema reader knows (the fuzzer then sent 0).
RowId = Annotated[int, Field(ge=1, le=MAX_INT), BeforeValidator(_no_text_or_bool)]
# A float that may be NaN or infinite (a metric, an lr a supervisor logged) is null in JSON.
Number = Annotated[float | None, BeforeValidator(_no_text_or_bool), PlainSerializer(json_number)]


class Record(BaseModel):
    """A shared record: what it declares is what goes out."""


class OptimizerState(Record):
    model_config = ConfigDict(extra="allow")  # what an optimizer has: AdamW no momentum, SGD no betas
    name: str
    lr: Number = None
    weight_decay: Number = None
    betas: list[Number] | None = None
    eps: Number = None
    momentum: Number = None


class RunState(Record):
    """A live run now: what `GET /api/state` answers and the WebSocket's state events carry."""

    model_config = ConfigDict(extra="allow")  # the bridge's snapshot may say more than this
    step: int
    max_steps: int | None = None
    epoch: Number = None
    max_grad_norm: Number = None
    branch: str
    optimizer: OptimizerState | None = None
    run_id: str | None
    phase: Phase = Field(description="created, running (paused while held), then finished, stopped or failed")
    paused: bool = Field(description="held by a pause command: no step is taken until resume")
    url: str | None
    world_size: int
    start_kept: bool = Field(False, description="a copy of step 0 is kept: a probe can train restart arms")
    metrics: dict[str, Number] = Field(description="The latest value of each metric; null: NaN or infinite.")


class Run(Record):
    id: str
    name: str
    kind: str
    status: str
    parent_run_id: str | None
    created_at: float
    finished_at: float | None
    summary: Any
    pid: int | None = None
    host: str | None = None


class RunDetail(Run):
    config: Any


class MetricPoint(Record):
    id: int
    run_id: str
    branch: str
    step: int
    name: str
    value: Number = Field(description="null where the logged value was NaN or infinite")
    time: float


class Command(Record):
    """A row of the journal."""

    uuid: str
    run_id: str
    type: str
    args: dict[str, Any]
    source: str
    status: CommandStatus
    created_at: float
    updated_at: float
    step: int | None = Field(description="the step it took effect (running, success)")
    result: Any = Field(description="what the handler returned (NaN or infinite numbers as null)")
    error: str | None
    idempotency_key: str | None = None


class Accepted(Record):
    uuid: str
    status: CommandStatus
    step: int = Field(description="the run's step when it was journaled")
    repeated: bool = Field(
        description="true: a repeat under an idempotency key, and this is the first command"
    )


class Checkpoint(Record):
    model_config = ConfigDict(extra="allow")
    name: str
    path: str | None  # None: held in memory (`memory: true`)
    memory: bool = False
    step: int
    branch: str
    source: str
    uuid: str


class Branch(Record):
    name: str
    parent: str | None
    checkpoint: str | None
    checkpoint_step: int | None
    fork_step: int | None
    uuid: str | None


class DecisionFields(Record):
    """What a supervisor decided at a step, and how it came to it."""

    step: Integer = Field(ge=0, le=MAX_INT)
    agent: str = Field(min_length=1, max_length=200, description="who decided: rule, llm, intervener ...")
    action: Action
    explanation: str = Field(default="", max_length=4000)
    strategy: str | None = Field(default=None, max_length=200, description="the prompt strategy, if any")
    model: str | None = Field(default=None, max_length=200)
    raw_output: str | None = Field(default=None, max_length=20_000, description="what the model said")
    lr_before: Number = None
    lr_after: Number = None
    latency_s: Number = None
    fallback: StrictBool = Field(default=False, description="no valid answer came: the safe action was taken")
    key: str | None = Field(
        default=None, max_length=400, description="idempotency key: a repeat returns the first decision"
    )
    retry_of: RowId | None = Field(
        default=None, description="the rolled-back decision this one was made in place of"
    )


def _json_only(value: dict | None) -> dict | None:
    """A free-form field the store keeps as JSON: no NaN or Infinity (spell them as strings)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be JSON (no NaN or Infinity: spell them as strings): {exc}") from None
    return value


# A free-form object the store keeps as JSON.
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_only)]


class NewDecision(DecisionFields):
    """A decision to record (`POST /api/decisions`), with the observation it was made on."""

    model_config = ConfigDict(extra="forbid")  # a key it does not know is refused, not dropped

    observation: JsonObject | None = Field(default=None, description="what the supervisor saw")


class Decision(DecisionFields):
    """A recorded decision (its observation stays in the store: `selfsteer decisions export`)."""

    id: int
    run_id: str
    created_at: float
    outcome: Any = Field(default=None, description="how the eval loss moved by the next observation")
    rolled_back: bool = Field(
        default=False, description="judged a failure at the next evaluation and rolled back"
    )
    reflection: str | None = Field(default=None, description="why it failed, by the supervisor itself")
    command: str | None = Field(
        default=None, description="uuid of the command that carried it out (none: keep)"
    )
    applied_step: int | None = Field(
        default=None,
        description="the step its command took effect (null: nothing sent, or not applied); `step` is "
        "where it was observed",
    )


class DecisionUpdate(Record):
    """What follows a decision (`PATCH /api/decisions/{id}`): its outcome, and under self-correction the
    reflection on it and whether it was rolled back."""

    model_config = ConfigDict(extra="forbid")

    outcome: JsonObject | None = None
    reflection: str | None = Field(default=None, min_length=1, max_length=4000)
    rolled_back: StrictBool | None = None
    command: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="uuid of this run's command that carries the decision out",
    )


class NewEpisode(Record):
    """A reflect episode to record: one task item, attempted, reflected on and retried."""

    task: str = Field(min_length=1, description="countdown, countdown:3, bfcl:simple_python ...")
    task_id: str | None = Field(default=None, description="the item (Countdown's are ints, BFCL's strings)")
    strategy: str | None = None
    model: str | None = None
    seed: int | None = None
    run_id: str | None = None

    @field_validator("task_id", mode="before")
    @classmethod
    def _as_text(cls, task_id: Any) -> str | None:
        return None if task_id is None else str(task_id)


class EpisodeAttempt(Record):
    """One answer of an episode and its verdict."""

    attempt_index: int = Field(ge=0)
    prompt: str
    response: str
    passed: StrictBool
    reason: str = ""


class EpisodeReflection(Record):
    """What the model wrote about a failed attempt, and its reward: 1 when the attempt after it passed."""

    after_attempt: int = Field(ge=0)
    text: str
    n_tokens: int | None = None
    reward: Number = None
