"""Runs and their metrics: creating, reopening and finishing runs, marking crashed ones failed (with
the commands they left unfinished), and storing and reading metric series (down-sampled for charts).
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import sqlite_utils

from selfsteer.trainer_bridge.store.base import StoreBase
from selfsteer.trainer_bridge.store.checks import _decode, _int, _json, _number, _optional_text, _text
from selfsteer.trainer_bridge.store.errors import StoreError

RUN_STATUSES = ("running", "finished", "failed", "stopped")


def lineage(rows: list[dict], branches: list[dict], branch: str) -> list[dict]:
    """The metric rows behind a run now on `branch`: the branch's own, and each ancestor's up to the
    checkpoint step it was forked from. A branch abandoned after a fork (a rollback, a resume) is not
    the history of the weights being trained, so it is left out."""
    tree = {b["name"]: b for b in branches}
    limits: dict[str, float] = {}
    name, limit = branch, math.inf
    while name is not None and name not in limits:
        limits[name] = limit
        node = tree.get(name)
        if node is None or node["parent"] is None:
            break
        limit = min(limit, node["checkpoint_step"])
        name = node["parent"]
    return [row for row in rows if row["step"] <= limits.get(row.get("branch", "main"), -math.inf)]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat): with the pid,
    it names one process, as a pid is handed to a new process once its own is gone. None where there
    is no /proc (not Linux) or no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may itself hold spaces and ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # fields[0] is field 3


def _run_process_gone(run: dict) -> str | None:
    """Why the process that owns a running run is gone (None: it is alive, or cannot be told)."""
    pid, started = run["pid"], run.get("process_start")
    if pid is None:
        return None
    if not _process_alive(pid):
        return f"its process {pid} is gone"
    now = process_start(pid) if started is not None else None
    if now is not None and now != started:
        return f"its process {pid} is gone; that pid is now another process's"
    return None


def _down_sampled(rows: Iterable[tuple], columns: list[str], width: int) -> list[tuple]:
    """Metric rows (in step order) thinned for a chart, in one pass: per series (branch, name) and range of
    `width` steps (step // width) the rows of lowest and highest value and the first NaN or infinite one,
    and each series' last row; in step order."""
    id_, branch, name, step, value = (columns.index(c) for c in ("id", "branch", "name", "step", "value"))
    lows: dict[tuple, tuple] = {}
    highs: dict[tuple, tuple] = {}
    broken: dict[tuple, tuple] = {}
    latest: dict[tuple, tuple] = {}
    for row in rows:
        key = (row[branch], row[name], row[step] // width)
        number = row[value]
        if number is None or math.isinf(number):  # NaN is stored as NULL
            broken.setdefault(key, row)
        else:
            if key not in lows or number < lows[key][value]:
                lows[key] = row
            if key not in highs or number > highs[key][value]:
                highs[key] = row
        latest[key[:2]] = row
    kept = {row[id_]: row for group in (lows, highs, broken, latest) for row in group.values()}
    return sorted(kept.values(), key=lambda row: (row[step], row[id_]))


class RunsMixin(StoreBase):
    def create_run(
        self, name: str, kind: str = "train", config: Any = None, parent_run_id: str | None = None
    ) -> str:
        row = {
            "id": uuid4().hex,
            "name": _text(name, "run name"),
            "kind": _text(kind, "run kind"),
            "config": _json(config, "run config"),
            "status": "running",
            "parent_run_id": _optional_text(parent_run_id, "parent_run_id"),
            "created_at": time.time(),
            "pid": os.getpid(),
            "process_start": process_start(os.getpid()),
            "host": socket.gethostname(),
        }
        self._write(lambda db: db["runs"].insert(row), f"cannot create run {name!r}")
        return row["id"]

    def reopen_run(self, run_id: str) -> dict:
        """A run that ended (a crash found by `recover_crashed_runs`, a stop) goes on: `running` again,
        owned by this process. For `selfsteer train --resume`."""

        def fn(db: sqlite_utils.Database) -> dict:
            run = self._get(db, "runs", run_id)
            if run is None:
                raise KeyError(f"unknown run {run_id!r}")
            if run["status"] == "running":
                raise StoreError(f"run {run_id} is still running (process {run['pid']} on {run['host']})")
            changes = {
                "status": "running",
                "finished_at": None,
                "pid": os.getpid(),
                "process_start": process_start(os.getpid()),
                "host": socket.gethostname(),
            }
            db["runs"].update(run_id, changes)
            return self._get(db, "runs", run_id)

        return self._write(fn, f"cannot reopen run {run_id!r}")

    def recover_crashed_runs(self) -> list[str]:
        """Runs marked `running` whose process on this host is gone (killed, crashed; its pid free, or
        another process's as its start time tells) are marked `failed`, and each command they left pending or running is journaled `failed` with the reason,
        so none waits forever. Returns their ids. Runs of other hosts are left alone (their processes
        cannot be seen from here)."""
        host = socket.gethostname()

        def fn(db: sqlite_utils.Database) -> list[str]:
            crashed = []
            for run in self._rows(db, "runs", {"status": "running", "host": host}, "created_at"):
                gone = _run_process_gone(run)
                if gone is None:
                    continue
                now, why = time.time(), f"the run crashed ({gone})"
                for command in self._rows(db, "commands", {"run_id": run["id"]}, "created_at, rowid"):
                    if command["status"] == "pending":
                        error = f"{why} before this command was applied"
                    elif command["status"] == "running":
                        error = f"{why} while this command was being applied; it may have taken effect"
                    else:
                        continue
                    db["commands"].update(
                        command["uuid"], {"status": "failed", "error": error, "updated_at": now}
                    )
                summary = {**(run["summary"] or {}), "error": why}
                db["runs"].update(
                    run["id"],
                    {"status": "failed", "finished_at": now, "summary": _json(summary, "run summary")},
                )
                crashed.append(run["id"])
            return crashed

        return self._write(fn, "cannot recover crashed runs")

    def finish_run(self, run_id: str, status: str = "finished", summary: Any = None) -> None:
        if status not in RUN_STATUSES[1:]:
            raise StoreError(f"a run finishes as one of {RUN_STATUSES[1:]}, not {status!r}")
        # A summary is a fact, like a command's result: a run that diverged has a NaN final loss.
        summary_json = _json(summary, "run summary", nan_as_null=True)
        changes = {"status": status, "finished_at": time.time(), "summary": summary_json}

        def fn(db: sqlite_utils.Database) -> None:
            run = self._get(db, "runs", run_id)
            if run is None:
                raise KeyError(f"unknown run {run_id!r}")
            if run["status"] != "running":
                raise StoreError(f"run {run_id} is already {run['status']}")
            db["runs"].update(run_id, changes)

        self._write(fn, f"cannot finish run {run_id!r}")

    def get_run(self, run_id: str) -> dict | None:
        return self._read(lambda db: self._get(db, "runs", run_id))

    def list_runs(self, kind: str | None = None, limit: int = 100) -> list[dict]:
        limit = _int(limit, "limit")
        return self._read(
            lambda db: self._rows(db, "runs", {"kind": kind}, "created_at DESC, rowid DESC", limit)
        )

    # ---- metrics

    def add_metrics(self, run_id: str, rows: Iterable[Mapping]) -> int:
        """Adds rows {step, name, value, branch='main', time=now} in one transaction; returns how many.
        NaN values are kept: they come back as NaN (stored as NULL)."""
        now = time.time()
        records = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise StoreError(f"a metric row must be a dict, got {row!r}")
            unknown = set(row) - {"step", "name", "value", "branch", "time"}
            if unknown or not {"step", "name", "value"} <= set(row):
                raise StoreError(
                    f"a metric row has keys step, name, value and optionally branch, time: {row!r}"
                )
            records.append(
                {
                    "run_id": run_id,
                    "branch": _text(row.get("branch", "main"), "metric branch"),
                    "step": _int(row["step"], "metric step"),
                    "name": _text(row["name"], "metric name"),
                    "value": _number(row["value"], f"value of metric {row['name']!r}"),
                    "time": _number(row.get("time", now), "metric time"),
                }
            )
        if records:
            self._write(lambda db: db["metrics"].insert_all(records), f"cannot add metrics to run {run_id!r}")
        return len(records)

    def get_metrics(
        self,
        run_id: str,
        since_step: int | None = None,
        names: Iterable[str] | None = None,
        branch: str | None = None,
        *,
        until_step: int | None = None,
        limit: int | None = None,
        points: int | None = None,
    ) -> list[dict]:
        """Metrics of a run ordered by (step, id). since_step: only steps strictly after it; until_step:
        only steps up to it; limit: the first `limit` rows.

        points: down-sampled for a chart. The steps from 0 to the series' last are cut into `points` ranges
        of equal width (the same ranges whatever since_step and until_step select, so that pages of one
        history agree); in each range a series (branch, name) keeps its row of lowest and of highest value
        (a spike stays visible) and its first NaN or infinite row, and each series its latest row: at most
        3 * points + 1 rows a series, and every row one that was logged."""
        series_where, series_args = ["run_id = ?"], [run_id]
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            series_where.append(f"name IN ({', '.join('?' * len(names))})")
            series_args.extend(names)
        if branch is not None:
            series_where.append("branch = ?")
            series_args.append(branch)
        where, args = list(series_where), list(series_args)
        if since_step is not None:
            where.append("step > ?")
            args.append(_int(since_step, "since_step"))
        if until_step is not None:
            where.append("step <= ?")
            args.append(_int(until_step, "until_step"))
        selected = " AND ".join(where)
        tail = ""
        if limit is not None:
            tail = f" LIMIT {_int(limit, 'limit')}"

        def fn(db: sqlite_utils.Database) -> list[dict]:
            width = None
            if points is not None:
                (last,) = db.execute(
                    f"SELECT MAX(step) FROM metrics WHERE {' AND '.join(series_where)}", series_args
                ).fetchone()
                width = max(1, -(-(max(last or 0, 0) + 1) // _int(points, "points")))  # ceil
            rows = db.execute(
                f"SELECT * FROM metrics WHERE {selected} ORDER BY step, id{'' if width else tail}", args
            )
            columns = [c[0] for c in rows.description]
            if width is not None:
                rows = _down_sampled(rows, columns, width)[:limit]
            return [_decode("metrics", dict(zip(columns, row, strict=True))) for row in rows]

        return self._read(fn)
