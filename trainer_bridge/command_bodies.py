"""The body of POST /api/commands, one model per registered command type: `CommandBody` (what every
command carries besides its args), `command_body` (the tagged union over a registry), `CommandBodies`
(its validator and its OpenAPI schema, rebuilt when the registry changes) and `fit_to_optimizer` (a run's
OpenAPI offers only the optimizer settings it has). Used by the control server (`server.py`)."""

import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
)

from selfsteer.trainer_bridge.commands import CommandRegistry


class CommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Who sends it: "human", an agent's name, "api" (the default), ...
    source: Annotated[str, Field(strict=True, min_length=1, max_length=64)] = "api"
    idempotency_key: Annotated[str, Field(strict=True, min_length=1, max_length=200)] | None = Field(
        None, description="A repeat under a key this run has seen returns the first command (repeated: true)."
    )


def command_body(registry: CommandRegistry) -> Any:
    """The request body of POST /api/commands: `{type, args, source, idempotency_key}` with `args` the
    registered model of that type, one variant per type. `args` may be left out where `{}` is valid."""
    names = sorted(registry.specs)
    known = ", ".join(names)
    variants = []
    for name in names:
        spec = registry.specs[name]
        try:
            spec.args_model.model_validate({})
            args_field: Any = Field(default_factory=spec.args_model)
        except ValueError:
            args_field = ...
        model = create_model(
            "".join(part.title() for part in name.split("_")) + "Command",
            __base__=CommandBody,
            __doc__=spec.description or None,
            type=(Literal[name], ...),
            args=(spec.args_model, args_field),
        )
        variants.append(Annotated[model, Tag(name)])

    def type_of(body: Any) -> str | None:
        kind = body.get("type") if isinstance(body, dict) else getattr(body, "type", None)
        return kind if isinstance(kind, str) and kind in registry.specs else None

    return Annotated[
        Union[tuple(variants)],  # noqa: UP007 - a Union built at run time
        Discriminator(
            type_of,
            custom_error_type="unknown_command",
            custom_error_message=f"unknown command type, or none: a command is an object whose type is one "
            f"of {known}",
        ),
    ]


class CommandBodies:
    """The body of POST /api/commands for the registry the bridge has now (a command may be registered, or
    the registry replaced, once the server runs): its validator and its OpenAPI schema, both rebuilt when
    the registry changes, so the server and the bridge never disagree on what a command is."""

    def __init__(self, get_registry: Callable[[], CommandRegistry]):
        self.get_registry = get_registry
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._adapter: TypeAdapter | None = None

    def adapter(self) -> TypeAdapter:
        registry = self.get_registry()
        key = tuple(
            (name, spec.args_model, spec.description) for name, spec in sorted(registry.specs.items())
        )
        with self._lock:
            if key != self._key or self._adapter is None:
                self._adapter, self._key = TypeAdapter(command_body(registry)), key
            return self._adapter

    def validate(self, body: Any) -> Any:
        try:
            return self.adapter().validate_python(body)
        except ValidationError as exc:
            errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
            raise RequestValidationError(errors) from None

    def document(self, openapi: dict) -> None:
        """Puts the body, and the models it names, into an OpenAPI document (changed in place)."""
        body = self.adapter().json_schema(ref_template="#/components/schemas/{model}")
        openapi.setdefault("components", {}).setdefault("schemas", {}).update(body.pop("$defs", {}))
        operation = openapi["paths"]["/api/commands"]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}


def fit_to_optimizer(openapi: dict, optimizer: dict | None) -> None:
    """The OpenAPI of a run whose optimizer exists: set_optimizer offers only the settings it has (AdamW no
    momentum), as the run refuses the others (422). Changes `openapi` in place."""
    args = openapi.get("components", {}).get("schemas", {}).get("SetOptimizerArgs")
    if not optimizer or args is None:
        return
    missing = [name for name in ("lr", "weight_decay", "betas", "eps", "momentum") if name not in optimizer]
    for name in missing:
        args["properties"].pop(name, None)
    args["anyOf"] = [branch for branch in args.get("anyOf", []) if branch["required"][0] not in missing]
