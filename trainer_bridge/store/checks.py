"""What goes into a row and what comes out of one: the checks of what callers pass in (each raises
StoreError with what was wrong), JSON in and out of the JSON columns, 0/1 back to bools, NULL back to
NaN for metrics. Kept together: they are to become the models of trainer_bridge/records.py.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
from typing import Any

from selfsteer.trainer_bridge.records import finite_or_null
from selfsteer.trainer_bridge.store.errors import StoreError

_JSON_COLUMNS = {
    "runs": ("config", "summary"),
    "commands": ("args", "result"),
    "decisions": ("observation", "outcome"),
}
_BOOL_COLUMNS = {
    "decisions": ("fallback", "rolled_back"),
    "episodes": ("passed_first", "passed_final"),
    "attempts": ("passed",),
}


def _decode(table: str, row: dict) -> dict:
    for column in _JSON_COLUMNS.get(table, ()):
        if row[column] is not None:
            row[column] = json.loads(row[column])
    for column in _BOOL_COLUMNS.get(table, ()):
        if row[column] is not None:
            row[column] = bool(row[column])
    if table == "metrics" and row["value"] is None:
        row["value"] = math.nan
    return row


def _json(value: Any, what: str, nan_as_null: bool = False) -> str | None:
    """JSON text for a column. JSON has no NaN or Infinity: they are refused, or with `nan_as_null`
    (what a command's result gets: a handler's outcome is a fact, an evaluation may well give NaN)
    stored as null."""
    if value is None:
        return None
    if nan_as_null:
        value = finite_or_null(value)
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON (no NaN or Infinity, no custom objects): {exc}") from exc


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise StoreError(f"{what} must be an integer, got {value!r}") from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StoreError(f"{what} must be a real number, got {value!r}")
    return float(value)


def _flag(value: Any, what: str) -> int:
    if value not in (True, False):
        raise StoreError(f"{what} must be a bool, got {value!r}")
    return int(bool(value))


def _record(value: Any, model: type) -> Any:
    """A row to store comes as its record (trainer_bridge/records.py), checked when it was made."""
    if not isinstance(value, model):
        raise StoreError(f"a row to store is a {model.__name__} (trainer_bridge.records), not {value!r}")
    return value
