"""Supervisor decisions: what an agent decided at a step and why, what followed (outcome), and for a
decision judged a failure the reflection on why (a supervisor's memory).
"""

from __future__ import annotations

import time
from typing import Any

import sqlite_utils

from selfsteer.trainer_bridge.records import NewDecision
from selfsteer.trainer_bridge.store.base import StoreBase
from selfsteer.trainer_bridge.store.checks import _decode, _flag, _int, _json, _record, _text


class DecisionsMixin(StoreBase):
    def add_decision(self, run_id: str, decision: NewDecision) -> int:
        """Stores a decision; returns its id. With a `key` this run has seen before, nothing is added
        and the first decision's id is returned (a supervisor that died after recording it)."""
        row = {
            **_record(decision, NewDecision).model_dump(exclude={"observation"}),
            "run_id": run_id,
            "observation": _json(decision.observation, "decision observation"),
            "fallback": int(decision.fallback),
            "created_at": time.time(),
        }

        def fn(db: sqlite_utils.Database) -> int:
            if decision.key is not None:
                first = self._rows(db, "decisions", {"run_id": run_id, "key": decision.key}, "id", 1)
                if first:
                    return first[0]["id"]
            return db["decisions"].insert(row).last_pk

        return self._write(fn, f"cannot add decision to run {run_id!r}")

    def get_decision(self, decision_id: int) -> dict | None:
        """The decision with this id, observation included."""

        def fn(db: sqlite_utils.Database) -> dict | None:
            row = self._get(db, "decisions", decision_id)
            return _with_applied_steps(db, [row])[0] if row is not None else None

        return self._read(fn)

    def find_decision(self, run_id: str, key: str) -> dict | None:
        """The decision stored under `key` in this run, if any."""
        rows = self._read(
            lambda db: _with_applied_steps(
                db, self._rows(db, "decisions", {"run_id": run_id, "key": key}, "id", 1)
            )
        )
        return rows[0] if rows else None

    def set_decision_command(self, decision_id: int, uuid: str) -> None:
        """The command that carries the decision out (a decision to keep has none): its step, once
        applied, is the decision's `applied_step`."""
        self._update(
            "decisions",
            decision_id,
            {"command": _text(uuid, "command")},
            f"cannot set the command of decision {decision_id!r}",
        )

    def set_decision_outcome(self, decision_id: int, outcome: Any) -> None:
        """What followed the decision (e.g. the loss some steps later), for training better interveners."""
        self._update(
            "decisions",
            decision_id,
            {"outcome": _json(outcome, "decision outcome")},
            f"cannot set the outcome of decision {decision_id!r}",
        )

    def set_reflection(self, decision_id: int, reflection: str, outcome: Any, rolled_back: bool) -> None:
        """The decision was judged a failure: why (`reflection`), what followed, and whether the run was
        rolled back to before it (else its lr change was undone)."""
        changes = {
            "rolled_back": _flag(rolled_back, "rolled_back"),
            "reflection": _text(reflection, "reflection"),
            "outcome": _json(outcome, "decision outcome"),
        }
        self._update(
            "decisions", decision_id, changes, f"cannot set the reflection of decision {decision_id!r}"
        )

    def list_reflections(
        self, run_id: str | None = None, *, agent: str | None = None, limit: int = 5
    ) -> list[dict]:
        """The latest decisions judged failures, with their reflections, newest first: of one run, or of
        every run (optionally of one agent): a supervisor's memory."""
        where, args = ["reflection IS NOT NULL"], []
        for column, value in (("run_id", run_id), ("agent", agent)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return self._read(
            lambda db: _with_applied_steps(
                db,
                [
                    _decode("decisions", row)
                    for row in db["decisions"].rows_where(
                        " AND ".join(where), args, order_by="id DESC", limit=limit
                    )
                ],
            )
        )

    def list_decisions(
        self, run_id: str | None = None, *, after_id: int | None = None, limit: int | None = None
    ) -> list[dict]:
        """Decisions of a run (of all runs when run_id is None) in the order they were made; with
        after_id or limit (paging) in the order of their ids."""
        if after_id is None and limit is None:
            return self._read(
                lambda db: _with_applied_steps(
                    db, self._rows(db, "decisions", {"run_id": run_id}, "created_at, id")
                )
            )
        where, args = ["id > ?"], [_int(after_id or 0, "after_id")]
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        return self._read(
            lambda db: _with_applied_steps(
                db,
                [
                    _decode("decisions", row)
                    for row in db["decisions"].rows_where(
                        " AND ".join(where), args, order_by="id", limit=limit
                    )
                ],
            )
        )


def _with_applied_steps(db: sqlite_utils.Database, rows: list[dict]) -> list[dict]:
    """Each decision with `applied_step`: the step its command took effect, or None (nothing sent, or
    not applied: pending, or failed). Read from the journal, so it is never out of date."""
    uuids = sorted({row["command"] for row in rows if row.get("command")})
    applied: dict[str, int] = {}
    for start in range(0, len(uuids), 500):  # SQLite's limit on bound parameters
        chunk = uuids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        query = f"SELECT uuid, step FROM commands WHERE status = 'success' AND uuid IN ({marks})"
        applied.update({uuid: step for uuid, step in db.execute(query, chunk).fetchall()})
    return [{**row, "applied_step": applied.get(row.get("command"))} for row in rows]
