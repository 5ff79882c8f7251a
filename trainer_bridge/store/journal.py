"""The command journal: every command sent to a run, from pending to running to success or failed,
each applied at most once (an idempotency key is stored once per run).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from uuid import uuid4

import sqlite_utils

from selfsteer.trainer_bridge.records import COMMAND_STATUSES
from selfsteer.trainer_bridge.store.base import StoreBase
from selfsteer.trainer_bridge.store.checks import _decode, _int, _json, _optional_text, _text
from selfsteer.trainer_bridge.store.errors import StoreError

# The journal only moves forward: a command is applied at most once and its outcome is never rewritten.
COMMAND_TRANSITIONS = {
    "pending": ("running", "failed"),
    "running": ("success", "failed"),
    "success": (),
    "failed": (),
}


class JournalMixin(StoreBase):
    def add_command(
        self,
        run_id: str,
        type: str,
        args: Mapping | None,
        source: str,
        uuid: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """Journals a command as pending. With an idempotency key that this run has seen before,
        nothing is added and the first command under that key is returned (decided inside the one
        write transaction, so two processes racing with the same key add one row)."""
        if args is not None and not isinstance(args, Mapping):
            raise StoreError(f"command args must be a dict, got {args!r}")
        now = time.time()
        row = {
            "uuid": _text(uuid, "command uuid") if uuid is not None else uuid4().hex,
            "run_id": run_id,
            "type": _text(type, "command type"),
            "args": _json(dict(args or {}), "command args"),
            "source": _text(source, "command source"),
            "status": "pending",
            "created_at": now,
            "updated_at": now,
            "idempotency_key": _optional_text(idempotency_key, "idempotency key"),
        }

        def fn(db: sqlite_utils.Database) -> dict:
            if idempotency_key is not None:
                where = {"run_id": run_id, "idempotency_key": idempotency_key}
                if first := self._rows(db, "commands", where, "rowid", 1):
                    return first[0]
            db["commands"].insert(row)
            return self._get(db, "commands", row["uuid"])

        return self._write(fn, f"cannot add {type!r} command to run {run_id!r}")

    def update_command(
        self, uuid: str, status: str, step: int | None = None, result: Any = None, error: str | None = None
    ) -> dict:
        """Moves a command along pending -> running -> success|failed (or pending -> failed).
        step, result and error are set when given and left alone when None."""
        if status not in COMMAND_STATUSES:
            raise StoreError(f"command status must be one of {COMMAND_STATUSES}, not {status!r}")
        changes: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if step is not None:
            changes["step"] = _int(step, "command step")
        if result is not None:
            changes["result"] = _json(result, "command result", nan_as_null=True)
        if error is not None:
            changes["error"] = str(error)

        def fn(db: sqlite_utils.Database) -> dict:
            command = self._get(db, "commands", uuid)
            if command is None:
                raise KeyError(f"unknown command {uuid!r}")
            if status not in COMMAND_TRANSITIONS[command["status"]]:
                raise StoreError(f"command {uuid} cannot go from {command['status']!r} to {status!r}")
            db["commands"].update(uuid, changes)
            return self._get(db, "commands", uuid)

        return self._write(fn, f"cannot update command {uuid!r}")

    def get_command(self, uuid: str) -> dict | None:
        return self._read(lambda db: self._get(db, "commands", uuid))

    def get_command_by_key(self, run_id: str, idempotency_key: str) -> dict | None:
        """The command this run journaled under an idempotency key, if any."""
        where = {"run_id": run_id, "idempotency_key": idempotency_key}
        rows = self._read(lambda db: self._rows(db, "commands", where, "rowid", 1))
        return rows[0] if rows else None

    def list_commands(
        self,
        run_id: str | None,
        status: str | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Commands of a run (of all runs when run_id is None) in the order they were added.
        after: only those added after the command with this uuid (none when no such command); limit:
        the first `limit` of them."""
        where = {"run_id": run_id, "status": status}
        if after is None:
            return self._read(lambda db: self._rows(db, "commands", where, "created_at, rowid", limit))
        clauses = {column: value for column, value in where.items() if value is not None}
        after_it = "(created_at, rowid) > (SELECT created_at, rowid FROM commands WHERE uuid = ?)"
        sql = " AND ".join([*(f"[{column}] = ?" for column in clauses), after_it])
        args = [*clauses.values(), after]
        return self._read(
            lambda db: [
                _decode("commands", row)
                for row in db["commands"].rows_where(sql, args, order_by="created_at, rowid", limit=limit)
            ]
        )
