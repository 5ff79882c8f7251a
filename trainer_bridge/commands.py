"""The commands a run accepts: an allow-list of names, each with a pydantic model for its arguments and a
handler that applies it at an optimizer-step boundary.

Nothing here calls "any method by name": a command type is a key of a `CommandRegistry`, and only
registered handlers run. Users add their own with `registry.register(...)`.

Arguments are checked twice: by the server before a command is journaled (bad input -> 422, nothing
queued), and again by the trainer before it applies one (a row written straight into the store by another
process gets the same checks; there a failure is journaled as `failed`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

if TYPE_CHECKING:
    from selfsteer.trainer_bridge.loop import StepContext
    from selfsteer.trainer_bridge.store import Store


class InvalidCommand(ValueError):
    """A command the run refuses before queueing it (HTTP 422)."""


class RunFinished(RuntimeError):
    """A command sent to a run that is over (HTTP 409)."""


class NotFound(LookupError):
    """No such command or decision in this run (HTTP 404)."""


class CommandError(RuntimeError):
    """A command that could not be applied; journaled as failed, training goes on."""


# -----------------------------------------------------------------------------
# argument models: strict (no "0.1" for 0.1, no true for 1.0), finite, no unknown keys

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, Field(strict=True, pattern=NAME_PATTERN)]
COMMAND_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"  # command types: identifiers, nothing path-like


def bounded(low: float, high: float, why: str) -> Any:
    """The type of a finite float in [low, high]; `why` is the reason for the bounds, shown in the OpenAPI."""
    return Annotated[float, Field(strict=True, ge=low, le=high, allow_inf_nan=False, description=why)]


# The bounds of the optimizer settings: where training can still work. A value outside them was never
# a setting anyone meant, and some break a run for good while it keeps logging (eps=5e-324 is 0 in
# float32, then betas=[0, 0] gave 0/0 = NaN in every weight with a zero gradient). Measured on the tiny
# recipe, set through the API at step 1, then 1500 steps: every corner of these bounds (lr 1 with
# weight decay 1, betas at each end of the staircase, eps at 1e-12 and 1, clipping off, 1e-3 and 1e4)
# kept every loss and gradient norm finite.
LR_BOUNDS = (1e-8, 1.0)
WEIGHT_DECAY_BOUNDS = (0.0, 1.0)
BETA_BOUNDS = (0.0, 0.9999)
EPS_BOUNDS = (1e-12, 1.0)
MOMENTUM_BOUNDS = (0.0, 0.99)
MAX_GRAD_NORM_BOUNDS = (1e-3, 1e4)  # or 0: no clipping

Lr = bounded(
    *LR_BOUNDS,
    "Learning rate. At least 1e-8: an Adam-type step moves a weight by about lr, and below 1e-8 that is "
    "lost in float32 rounding (the run stops learning without saying so); a rescaled schedule also divides "
    "by the current lr, which must not underflow. At most 1, about the largest an SGD run uses; Adam-type "
    "runs fail long before (the tiny recipe from the start: loss 41 after 1500 steps at lr 1, 409 at 10, "
    "2.0 at 3e-3).",
)
WeightDecay = bounded(
    *WEIGHT_DECAY_BOUNDS,
    "Weight decay (of the groups that decay). At most 1: with lr <= 1 a decoupled decay step multiplies "
    "weights by 1 - lr * weight_decay, which then stays in [0, 1]; more flips and grows them (1.8e308 "
    "makes it -inf).",
)
Beta = bounded(
    *BETA_BOUNDS,
    "Moment decay rate. At most 0.9999 (a memory of about 10,000 steps): at 1 the moment never forgets.",
)
# Adam's step m / (sqrt(v) + eps) stays bounded while beta1 ** 2 <= beta2 (Kingma & Ba); past it the first
# moment outgrows the second (measured: betas [0.9, 0] gave NaN at step 12 of the tiny recipe). JSON Schema
# cannot relate two items, so the rule is a staircase just inside that curve, in the OpenAPI and here alike:
# (beta1 up to, beta2 at least).
BETA_STAIRS = ((0.0, 0.0), (0.5, 0.25), (0.9, 0.81), (0.95, 0.9025), (0.99, 0.9801), (0.9999, 0.9998))


def _beta2_floor(beta1: float) -> float:
    return next(floor for top, floor in BETA_STAIRS if beta1 <= top)


def _betas_fit(betas: tuple[float, float]) -> tuple[float, float]:
    beta1, beta2 = betas
    if beta2 < (floor := _beta2_floor(beta1)):
        raise ValueError(
            f"with beta1 = {beta1}, beta2 must be at least {floor}: Adam's step stays bounded only while "
            "beta1 ** 2 <= beta2"
        )
    return betas


def _betas_schema() -> dict:
    def number(low: float, high: float) -> dict:
        return {"type": "number", "minimum": low, "maximum": high}

    stairs, low = [], BETA_BOUNDS[0]
    for top, floor in BETA_STAIRS:
        stairs.append({"prefixItems": [number(low, top), number(floor, BETA_BOUNDS[1])]})
        low = top
    return {
        "type": "array",
        "minItems": 2,
        "maxItems": 2,
        "anyOf": stairs,
        "description": "[beta1, beta2]: each in [0, 0.9999] (at 1 a moment never forgets), and beta2 at least "
        "the floor of beta1's stair ("
        + ", ".join(f"beta1 <= {t}: beta2 >= {f}" for t, f in BETA_STAIRS)
        + "), a staircase inside beta1 ** 2 <= beta2, where Adam's step stays bounded (betas [0.9, 0] gave "
        "NaN after 12 steps).",
    }


Betas = Annotated[tuple[Beta, Beta], AfterValidator(_betas_fit), WithJsonSchema(_betas_schema())]
Eps = bounded(
    *EPS_BOUNDS,
    "Adam's epsilon. At least 1e-12, a normal float32 number: below about 1.4e-45 it is 0 in float32, and a "
    "weight whose gradient is 0 then gets 0/0 = NaN. At most 1: beyond, the step is lr * m / eps and "
    "barely moves.",
)
Momentum = bounded(
    *MOMENTUM_BOUNDS,
    "SGD momentum. At most 0.99, which already multiplies the step by 100 (1 / (1 - momentum)); at 1 the "
    "velocity never decays.",
)
ClipOff = Annotated[
    float,
    Field(strict=True, ge=0, le=0, description="0 turns gradient clipping off (as in TrainingArguments)."),
]
ClipNorm = bounded(
    *MAX_GRAD_NORM_BOUNDS,
    "Clip the gradient norm to this. At least 1e-3: a smaller norm scales every gradient toward 0 and the "
    "run stops learning (1e-300 is 0 in float32); at most 1e4, beyond which it clips nothing: use 0.",
)


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    pass


OPTIMIZER_SETTINGS = ("lr", "weight_decay", "betas", "eps", "momentum")


class SetOptimizerArgs(Args):
    """At least one of lr, weight_decay, betas, eps, momentum; each inside its bounds. A setting is left out
    to keep it (null is not a value)."""

    model_config = ConfigDict(
        # What the validator below says, for the OpenAPI: at least one setting; schedule only with lr.
        json_schema_extra={
            "anyOf": [{"required": [name]} for name in OPTIMIZER_SETTINGS],
            "dependentRequired": {"schedule": ["lr"]},
        }
    )

    # Not nullable: the default None means "not given"; an explicit null is refused.
    lr: Lr = None
    weight_decay: WeightDecay = None
    betas: Betas = None
    eps: Eps = None
    momentum: Momentum = None
    # How a new lr meets the LR schedule (trainer_bridge/optim.py): "scale" the remaining schedule so it
    # passes through the new value, or hold the lr "constant" at it whatever the scheduler says.
    schedule: Literal["scale", "constant"] = "scale"

    @model_validator(mode="after")
    def _at_least_one(self) -> SetOptimizerArgs:
        if all(value is None for name, value in self if name != "schedule"):
            raise ValueError("set_optimizer needs at least one of lr, weight_decay, betas, eps, momentum")
        if "schedule" in self.model_fields_set and self.lr is None:
            raise ValueError("schedule says how a new lr meets the LR schedule: it needs lr")
        return self


class SetMaxGradNormArgs(Args):
    value: ClipOff | ClipNorm


class SaveCheckpointArgs(Args):
    name: Name | None = None
    # In memory, exact and fast (a fork to come back to soon); gone with the process, and only the
    # latest few are kept. False: a folder on disk, loadable after a restart.
    memory: bool = False


class LoadCheckpointArgs(Args):
    checkpoint: Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
    # The validator's rule, for the OpenAPI too.
    branch: Name | None = Field(None, json_schema_extra={"not": {"const": "main"}})

    @model_validator(mode="after")
    def _not_main(self) -> LoadCheckpointArgs:
        if self.branch == "main":
            raise ValueError("'main' is the run's first branch; a loaded checkpoint starts a new one")
        return self


ProbeFactor = bounded(
    1 / 64,
    64,
    "A multiple of the lr in force that one arm of the probe trains at (clamped to the lr bounds).",
)


class ProbeArgs(Args):
    """Train `steps` optimizer steps at each factor of the current lr, each arm from the same exact
    snapshot and on the same batches, then restore the snapshot (trainer_bridge/probe.py)."""

    factors: list[ProbeFactor] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1, max_length=8)
    # Steps per arm: a few, so a probe costs len(factors) x steps optimizer steps.
    steps: Annotated[int, Field(strict=True, ge=1, le=200)] = 4
    # Where each arm's eval-slice loss is extrapolated to, in steps from now (default: 2 x steps).
    horizon: Annotated[int, Field(strict=True, ge=1, le=100_000)] | None = None
    # Restart arms: from the run's start (kept with BridgeConfig keep_start), the whole schedule times each
    # factor, as many steps as the run has trained; each ends an in-memory checkpoint a loop may load.
    restart: list[ProbeFactor] = Field(default_factory=list, max_length=4)

    @model_validator(mode="after")
    def _distinct(self) -> ProbeArgs:
        if len(set(self.factors)) != len(self.factors) or len(set(self.restart)) != len(self.restart):
            raise ValueError("each factor once: two arms at one lr measure the same thing")
        if self.horizon is not None and self.horizon < self.steps:
            raise ValueError("the horizon is where each arm is extrapolated to: at least steps")
        return self


class ReloadDataArgs(Args):
    dataset: Name | None = None  # a registered data factory; default: reload the current one


# -----------------------------------------------------------------------------
# the registry

Handler = Callable[["StepContext", Any], Any]
Check = Callable[[Any, Any], None]  # (bridge, args) -> raises InvalidCommand


@dataclass(frozen=True)
class CommandSpec:
    name: str
    args_model: type[Args]
    handler: Handler
    description: str = ""
    # Whether `replay` applies it again (or a function of the journaled args that says so). Pause/resume
    # change nothing a replay could observe.
    replay: bool | Callable[[dict], bool] = True
    # Extra checks against the live run, at submit time (e.g. momentum on an optimizer without it).
    check: Check | None = None


@dataclass
class CommandRegistry:
    specs: dict[str, CommandSpec] = field(default_factory=dict)

    def register(
        self,
        name: str,
        args_model: type[Args] = NoArgs,
        description: str = "",
        replay: bool | Callable[[dict], bool] = True,
        check: Check | None = None,
    ) -> Callable[[Handler], Handler]:
        """Decorator: `@registry.register("set_dropout", DropoutArgs)` over `def f(ctx, args): ...`.
        The handler's return value (JSON) is journaled as the command's result."""
        if not re.match(COMMAND_PATTERN, name):
            raise ValueError(f"command name {name!r} must match {COMMAND_PATTERN}")

        def decorator(handler: Handler) -> Handler:
            self.specs[name] = CommandSpec(name, args_model, handler, description, replay, check)
            return handler

        return decorator

    def copy(self) -> CommandRegistry:
        return CommandRegistry(dict(self.specs))

    def get(self, name: str) -> CommandSpec:
        spec = self.specs.get(name)
        if spec is None:
            known = ", ".join(sorted(self.specs))
            raise InvalidCommand(f"unknown command type {name!r} (known: {known})")
        return spec

    def parse(self, name: str, args: Any) -> tuple[CommandSpec, Args]:
        spec = self.get(name)
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise InvalidCommand(f"args of {name!r} must be an object, got {type(args).__name__}")
        try:
            return spec, spec.args_model.model_validate(args)
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'args'}: {err['msg']}" for err in exc.errors()
            )
            raise InvalidCommand(f"bad args for {name!r}: {reasons}") from None

    def describe(self) -> list[dict]:
        return [
            {"type": s.name, "description": s.description, "args_schema": s.args_model.model_json_schema()}
            for s in sorted(self.specs.values(), key=lambda s: s.name)
        ]


def dump_args(args: Args) -> dict:
    """What the journal keeps: only what the caller set, in JSON form, so a replay parses the same."""
    return args.model_dump(mode="json", exclude_unset=True)


# -----------------------------------------------------------------------------
# commands in the journal


def same_command(first: dict, key: str, type: str, parsed: Args) -> dict:
    """The command first journaled under an idempotency key, when this one is the same; another
    command under the same key is refused (a client bug that a silent return would hide)."""
    if first["type"] != type or first["args"] != dump_args(parsed):
        raise InvalidCommand(
            f"idempotency key {key!r} was used for another command ({first['type']} {first['args']},"
            f" {first['uuid']})"
        )
    return first


def replay_plan(store: Store, registry: CommandRegistry, run_id: str) -> dict[int, list[dict]]:
    """What a replay of run `run_id` applies: the original run's applied commands by step, keeping only
    what changes the training."""
    if store.get_run(run_id) is None:
        raise KeyError(f"no run {run_id!r} in {store.path}")
    by_step: dict[int, list[dict]] = {}
    for command in store.list_commands(run_id, status="success"):
        spec = registry.specs.get(command["type"])
        replays = spec is None or (spec.replay(command["args"]) if callable(spec.replay) else spec.replay)
        if command["source"] == "trainer" or not replays:
            continue  # the Trainer's own saves happen again by themselves
        by_step.setdefault(command["step"], []).append(command)
    for commands in by_step.values():
        # Applied order, not submitted order: `updated_at` of a success is when it ran.
        commands.sort(key=lambda c: c["updated_at"])
    return by_step
