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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from selfsteer.trainer_bridge.bridge import StepContext


class InvalidCommand(ValueError):
    """A command the run refuses before queueing it (HTTP 422)."""


class CommandError(RuntimeError):
    """A command that could not be applied; journaled as failed, training goes on."""


# -----------------------------------------------------------------------------
# argument models: strict (no "0.1" for 0.1, no true for 1.0), finite, no unknown keys

Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, Field(strict=True, pattern=NAME_PATTERN)]
COMMAND_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"  # command types: identifiers, nothing path-like


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(Args):
    pass


class SetOptimizerArgs(Args):
    lr: Annotated[float, Field(strict=True, gt=0, le=100, allow_inf_nan=False)] | None = None
    weight_decay: NonNegative | None = None
    betas: tuple[Beta, Beta] | None = None
    eps: Positive | None = None
    momentum: Annotated[float, Field(strict=True, ge=0, le=1, allow_inf_nan=False)] | None = None
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
    value: NonNegative  # 0 turns clipping off, as in TrainingArguments


class SaveCheckpointArgs(Args):
    name: Name | None = None


class LoadCheckpointArgs(Args):
    checkpoint: Annotated[str, Field(strict=True, min_length=1, max_length=4096)]
    branch: Name | None = None

    @model_validator(mode="after")
    def _not_main(self) -> LoadCheckpointArgs:
        if self.branch == "main":
            raise ValueError("'main' is the run's first branch; a loaded checkpoint starts a new one")
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
    # Whether `replay` applies it again. Pause/resume change nothing a replay could observe.
    replay: bool = True
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
        replay: bool = True,
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
