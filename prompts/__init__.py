"""Versioned prompt templates, stored as YAML data files beside this module. The learning-rate
supervisor's strategies are the `lr_*.yaml` files; a strategy is named, so runs that used it can be
compared and replayed:

    from selfsteer.prompts import load_strategy, list_strategies
    strategy = load_strategy("json_history")      # or a path to a .yaml file of the same shape
    strategy.render_user(step=..., lr=..., ...)

A file has: name, version, description, schema ("decision": action then explanation; "reasoned":
reasoning then action), system, user (a `str.format` template over the observation's values,
`Observation.prompt_values()`: {history_json}, {stats}, {table}, ...; a template uses those it wants).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, get_args

import yaml

HERE = Path(__file__).parent
FIELDS = ("name", "version", "description", "schema", "system", "user")

# How the self-correction loop retries; reflect_v*.yaml holds the texts of each.
ReflectStrategy = Literal["retry", "reflect", "reflect_attempt", "memory"]
REFLECT_STRATEGIES: tuple[str, ...] = get_args(ReflectStrategy)


@dataclass(frozen=True)
class PromptStrategy:
    name: str
    version: int
    description: str
    schema: str
    system: str
    user: str

    @property
    def id(self) -> str:
        """What a decision record stores: name and version."""
        return f"{self.name}@v{self.version}"

    def render_user(self, **values) -> str:
        return self.user.format(**values).strip()


def _files() -> dict[str, Path]:
    files = {}
    for path in sorted(HERE.glob("lr_*.yaml")):
        files[yaml.safe_load(path.read_text())["name"]] = path
    return files


@cache
def load_prompts(version: str = "v1") -> dict[str, str]:
    """The self-correction loop's texts, reflect_{version}.yaml (v1: the tasks'; decisions: lr decisions)."""
    return yaml.safe_load((HERE / f"reflect_{version}.yaml").read_text())


def list_strategies() -> list[str]:
    return list(_files())


def load_strategy(name_or_path: str) -> PromptStrategy:
    """A built-in strategy by name, or a YAML file by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        files = _files()
        if name_or_path not in files:
            raise ValueError(
                f"unknown prompt strategy {name_or_path!r}: choose one of {', '.join(files)} or a .yaml file"
            )
        path = files[name_or_path]
    data = yaml.safe_load(path.read_text())
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if data["schema"] not in ("decision", "reasoned"):
        raise ValueError(f"{path}: schema must be decision or reasoned")
    return PromptStrategy(**{f: data[f] for f in FIELDS})
