"""The two records of counterfactual decision data: a collected row (`selfsteer decisions collect`, one per
decision point, a line of rows.jsonl) and the labelled chat example made of it (agents/intervener_data.py,
`selfsteer decisions export --counterfactual`). Written here once, read everywhere by attribute.

Persisted as strict JSON: a non-finite number is null (`records.strict_json`), as in the API and the journal.
A branch that diverged has the outcome None (null; older files may spell it NaN, read as None too), which
the labels count as an infinite loss. The row's observation is `Observation.to_dict()` as JSON holds it: a
non-finite loss None (older files' NaN tokens are read as None too), which `Observation.from_record` (the
row's `observed`) reads as NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, field_validator

from selfsteer.agents.observation import Observation
from selfsteer.trainer_bridge.records import Action, finite_or_null, json_number, strict_json

# An eval loss a branch reached: None where it was not finite (the branch diverged).
Outcome = Annotated[float | None, AfterValidator(json_number)]
# How much worse an action lands than the best one, relative: infinite (null in JSON) where it diverged.
Regret = Annotated[float, BeforeValidator(lambda value: math.inf if value is None else value)]


class _Line(BaseModel):
    """A record of a .jsonl file: validated from a line, written as one (strict JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_json(cls, line: str):
        """From a line as written (old files' NaN and Infinity tokens included)."""
        return cls.model_validate(json.loads(line))

    def to_json(self) -> str:
        return strict_json(self.model_dump())


class Behaviour(_Line):
    """What the collection run did at the decision point (its behaviour policy's decision)."""

    action: Action
    explanation: str


class CounterfactualRow(_Line):
    """One decision point of a collection run (evals/counterfactual.collect_run): what the run looked like
    and the eval loss each action reached from the identical state."""

    spec: dict[str, Any]  # the run's RunSpec.to_dict()
    run: str  # the spec's id
    step: int
    lr: float  # the lr at the decision
    observation: dict[str, Any]  # Observation.to_dict(), as JSON
    behaviour: Behaviour
    horizon: int | None = None  # the steps each branch ran
    outcomes: dict[str, Outcome]  # action -> the eval loss its branch reached after `horizon` steps
    probe: Outcome = None  # "keep" again under another data order and dropout draw (the noise probe)

    @field_validator("observation")
    @classmethod
    def _as_persisted(cls, observation: dict[str, Any]) -> dict[str, Any]:
        """As JSON holds it, in memory too: a non-finite number None (Observation.from_record: NaN)."""
        return finite_or_null(observation)

    @property
    def observed(self) -> Observation:
        """The observation as the supervisor sees it."""
        return Observation.from_record(self.observation)

    def losses(self) -> dict[str, float]:
        """Each action's outcome, a diverged branch's as infinite."""
        return {a: (v if v is not None else math.inf) for a, v in self.outcomes.items()}


class IntervenerExample(_Line):
    """A row labelled, with the chat the intervener is trained on (agents/intervener_data.examples)."""

    run: str
    step: int
    spec: dict[str, Any]
    lr: float
    outcomes: dict[str, Outcome]
    probe: Outcome = None
    horizon: int | None = None
    behaviour: Action  # the collection run's own action
    label: Action
    regret: dict[str, Regret]  # action -> its loss over the best one's, relative
    prompt: list[dict[str, str]]  # chat messages: role, content
    completion: list[dict[str, str]]  # the answer, as one assistant message


def read_rows(paths: Iterable[str | Path]) -> list[CounterfactualRow]:
    """Rows of collection output: `rows.jsonl` files, or folders holding them (searched recursively)."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"no collected data at {path}")
        files = sorted(path.rglob("rows.jsonl")) if path.is_dir() else [path]
        for file in files:
            rows += [
                CounterfactualRow.from_json(line) for line in file.read_text().splitlines() if line.strip()
            ]
    return rows
