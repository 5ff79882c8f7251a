"""The selfsteer store: one SQLite file for runs, metrics, the command journal, agent decisions and
self-correction episodes.

Many writers share the file at once: the trainer callback, the control server's threads, supervisor
agents and scripts in other processes. Hence:
- WAL, so readers never block the writer and the writer never blocks readers;
- a 30 s busy timeout, so a writer waits for another instead of failing;
- short `BEGIN IMMEDIATE` write transactions: they take the write lock up front. A transaction that
  reads first and writes later must upgrade its lock, and in WAL that upgrade fails at once with
  "database is locked" when another writer got in between, whatever the busy timeout;
- one connection per thread (a sqlite3 connection must not be used by two threads at once), and one
  write lock per process, so that threads queue on a Python lock instead of polling SQLite's;
- a few retries on "database is locked" for what the timeout does not cover.

The schema version lives in `PRAGMA user_version`. MIGRATIONS[i] takes the schema from version i to
i + 1 and is never edited once released: a schema change is a new function appended to the list.
Times are unix seconds (float); JSON columns are TEXT and come back decoded.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import sqlite_utils
from sqlite_utils.db import NotFoundError

DEFAULT_DB_PATH = "selfsteer.sqlite"
BUSY_TIMEOUT_S = 30.0
LOCK_RETRIES = 5

RUN_STATUSES = ("running", "finished", "failed", "stopped")
COMMAND_STATUSES = ("pending", "running", "success", "failed")
# The journal only moves forward: a command is applied at most once and its outcome is never rewritten.
COMMAND_TRANSITIONS = {
    "pending": ("running", "failed"),
    "running": ("success", "failed"),
    "success": (),
    "failed": (),
}


class StoreError(Exception):
    """Bad input, a file this code cannot use, or a database that stayed locked."""


# -----------------------------------------------------------------------------
# schema migrations


def _v1_initial_schema(conn: sqlite3.Connection) -> None:
    # CHECK constraints rather than STRICT tables: STRICT needs SQLite 3.37, older than some distros ship.
    statements = [
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            config TEXT,
            status TEXT NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'finished', 'failed', 'stopped')),
            parent_run_id TEXT REFERENCES runs(id),
            created_at REAL NOT NULL,
            finished_at REAL,
            summary TEXT
        )""",
        "CREATE INDEX runs_created ON runs(created_at)",
        # value is NULL for NaN: SQLite cannot hold a NaN and binds it as NULL.
        """CREATE TABLE metrics (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            branch TEXT NOT NULL DEFAULT 'main',
            step INTEGER NOT NULL,
            name TEXT NOT NULL,
            value REAL,
            time REAL NOT NULL
        )""",
        "CREATE INDEX metrics_run_step ON metrics(run_id, step)",
        """CREATE TABLE commands (
            uuid TEXT PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            type TEXT NOT NULL,
            args TEXT NOT NULL,
            source TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'success', 'failed')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            step INTEGER,
            result TEXT,
            error TEXT
        )""",
        "CREATE INDEX commands_run_created ON commands(run_id, created_at)",
        """CREATE TABLE decisions (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            step INTEGER NOT NULL,
            agent TEXT NOT NULL,
            strategy TEXT,
            model TEXT,
            observation TEXT,
            raw_output TEXT,
            action TEXT NOT NULL,
            explanation TEXT NOT NULL DEFAULT '',
            lr_before REAL,
            lr_after REAL,
            latency_s REAL,
            fallback INTEGER NOT NULL DEFAULT 0 CHECK (fallback IN (0, 1)),
            created_at REAL NOT NULL,
            outcome TEXT
        )""",
        "CREATE INDEX decisions_run_step ON decisions(run_id, step)",
        """CREATE TABLE episodes (
            id INTEGER PRIMARY KEY,
            run_id TEXT REFERENCES runs(id),
            task TEXT NOT NULL,
            task_id TEXT,
            strategy TEXT,
            model TEXT,
            seed INTEGER,
            status TEXT NOT NULL DEFAULT 'running',
            passed_first INTEGER CHECK (passed_first IN (0, 1)),
            passed_final INTEGER CHECK (passed_final IN (0, 1)),
            created_at REAL NOT NULL,
            finished_at REAL
        )""",
        "CREATE INDEX episodes_run ON episodes(run_id)",
        "CREATE INDEX episodes_task ON episodes(task)",
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY,
            episode_id INTEGER NOT NULL REFERENCES episodes(id),
            attempt_index INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            response TEXT NOT NULL,
            passed INTEGER NOT NULL CHECK (passed IN (0, 1)),
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            UNIQUE (episode_id, attempt_index)
        )""",
        """CREATE TABLE reflections (
            id INTEGER PRIMARY KEY,
            episode_id INTEGER NOT NULL REFERENCES episodes(id),
            after_attempt INTEGER NOT NULL,
            text TEXT NOT NULL,
            n_tokens INTEGER,
            reward REAL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX reflections_episode ON reflections(episode_id)",
    ]
    # One execute() per statement: executescript() would COMMIT the migration transaction first.
    for statement in statements:
        conn.execute(statement)


def _v2_idempotency_and_run_owner(conn: sqlite3.Connection) -> None:
    # A command or decision sent twice under one key is stored once: the unique indexes are the
    # backstop of the check-then-insert that add_command/add_decision make inside one transaction.
    # A run's process (pid on host) tells a crashed run (its process is gone) from a live one.
    for statement in [
        "ALTER TABLE commands ADD COLUMN idempotency_key TEXT",
        """CREATE UNIQUE INDEX commands_idempotency ON commands(run_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL""",
        "ALTER TABLE decisions ADD COLUMN key TEXT",
        "CREATE UNIQUE INDEX decisions_key ON decisions(run_id, key) WHERE key IS NOT NULL",
        "ALTER TABLE runs ADD COLUMN pid INTEGER",
        "ALTER TABLE runs ADD COLUMN host TEXT",
    ]:
        conn.execute(statement)


def _v3_self_correction(conn: sqlite3.Connection) -> None:
    # A decision judged a failure is rolled back with a reflection on why; the decision made again in
    # its place points at it (retry_of).
    for statement in [
        "ALTER TABLE decisions ADD COLUMN rolled_back INTEGER NOT NULL DEFAULT 0 CHECK (rolled_back IN (0, 1))",
        "ALTER TABLE decisions ADD COLUMN reflection TEXT",
        "ALTER TABLE decisions ADD COLUMN retry_of INTEGER REFERENCES decisions(id)",
    ]:
        conn.execute(statement)


# Append only. A migration gets a connection inside an open transaction and must not commit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1_initial_schema, _v2_idempotency_and_run_owner, _v3_self_correction,
]  # fmt: skip


def json_number(value: float | None) -> float | None:
    """A metric value for JSON, which has no NaN or Infinity: those become null."""
    return value if value is not None and math.isfinite(value) else None


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _retry_locked(fn: Callable[[], Any], what: str) -> Any:
    # The busy timeout already waited up to 30 s; what still comes back as "locked" is mostly a
    # lock that SQLite refuses to wait for (WAL recovery, a journal-mode switch). Back off and retry.
    for attempt in range(LOCK_RETRIES + 1):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc):
                raise
            if attempt == LOCK_RETRIES:
                raise StoreError(f"{what}: the database stayed locked after {LOCK_RETRIES} retries") from exc
            time.sleep(random.uniform(0.02, 0.1) * 2**attempt)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _db_file(conn: sqlite3.Connection) -> str:
    return next((row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"), "?")


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Bring the file forward to schema version `target` (default: the newest this code knows).
    Returns how many migrations this call ran. They all run in one transaction, so a failure leaves
    the file as it was."""
    newest = len(MIGRATIONS)
    target = newest if target is None else operator.index(target)
    if not 0 <= target <= newest:
        raise StoreError(f"schema version {target} does not exist (this code knows 0..{newest})")
    if conn.in_transaction:
        raise StoreError("migrate() needs a connection with no open transaction")

    def check(version: int) -> None:
        if version > newest:
            raise StoreError(
                f"{_db_file(conn)} has schema version {version}, but this selfsteer only knows up to "
                f"version {newest}: upgrade selfsteer (pip install -U selfsteer) to open it"
            )

    version = conn.execute("PRAGMA user_version").fetchone()[0]
    check(version)
    if version >= target:
        return 0

    def run() -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock: decide again under it.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            check(version)
            for migration in MIGRATIONS[version:target]:
                migration(conn)
            if version < target:
                conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
            return max(0, target - version)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    return _retry_locked(run, "migrating the schema")


def connect(path: str | os.PathLike) -> sqlite_utils.Database:
    """A new connection to the file, set up for many concurrent writers. No schema check."""
    # isolation_level=None: no implicit transactions; the store opens and closes its own.
    # check_same_thread=False only so that close() may close it from another thread: each connection
    # is otherwise used by the one thread that made it.
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        db = sqlite_utils.Database(conn)
        _retry_locked(db.enable_wal, "switching to WAL")
        # In WAL, NORMAL never corrupts the file; a power cut may lose the last commits, not tear them.
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return db


# -----------------------------------------------------------------------------
# row encoding


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
        value = _finite_or_null(value)
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON (no NaN or Infinity, no custom objects): {exc}") from exc


def _finite_or_null(value: Any) -> Any:
    """The value with every NaN or infinite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


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


def _optional_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise StoreError(f"{what} must be a real number, got {value!r}")
    return float(value)


def _optional_number(value: Any, what: str) -> float | None:
    return None if value is None else _number(value, what)


def _flag(value: Any, what: str) -> int:
    if value not in (True, False):
        raise StoreError(f"{what} must be a bool, got {value!r}")
    return int(bool(value))


# -----------------------------------------------------------------------------
# the store


class Store:
    """Thread-safe and process-safe access to the selfsteer SQLite file. Rows come out as plain dicts."""

    def __init__(self, path: str | os.PathLike = DEFAULT_DB_PATH):
        if str(path) in ("", ":memory:"):
            # Every thread has its own connection, and each would get its own empty in-memory database.
            raise StoreError("the store needs a file path, not an in-memory database")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards _connections and _closed
        self._closed = False
        self._reset_connections()
        try:
            db = self._db()
            self.applied_migrations = migrate(db.conn)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _reset_connections(self) -> None:
        self._pid = os.getpid()
        self._local = threading.local()
        self._connections: list[sqlite_utils.Database] = []
        self._write_lock = threading.Lock()

    def _db(self) -> sqlite_utils.Database:
        if self._closed:
            raise StoreError(f"the store at {self.path} is closed")
        if os.getpid() != self._pid:
            # A forked child (DataLoader worker, multiprocessing 'fork') must not touch the parent's
            # connections: SQLite's locks would break. Start afresh; the parent still owns the old ones.
            self._reset_connections()
        db = getattr(self._local, "db", None)
        if db is None:
            db = connect(self.path)
            with self._lock:
                self._connections.append(db)
            self._local.db = db
        return db

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def schema_version(self) -> int:
        return self._db().execute("PRAGMA user_version").fetchone()[0]

    # Every read and write is fn(db) inside one short transaction, retried whole if the file stays
    # locked; so fn must only touch the database (and must not call other public methods).

    def _transaction(self, fn: Callable[[sqlite_utils.Database], Any], what: str, write: bool) -> Any:
        db = self._db()

        def run() -> Any:
            db.conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(db)
                db.conn.execute("COMMIT")
                return result
            except BaseException:
                if db.conn.in_transaction:
                    db.conn.execute("ROLLBACK")
                raise

        try:
            if not write:
                return _retry_locked(run, what)
            with self._write_lock:
                return _retry_locked(run, what)
        except sqlite3.IntegrityError as exc:
            # Foreign keys, uniqueness, CHECKs: the caller passed something the schema refuses.
            raise StoreError(f"{what}: {exc}") from exc

    def _read(self, fn: Callable[[sqlite_utils.Database], Any], what: str = "reading the store") -> Any:
        return self._transaction(fn, what, write=False)

    def _write(self, fn: Callable[[sqlite_utils.Database], Any], what: str) -> Any:
        return self._transaction(fn, what, write=True)

    @staticmethod
    def _get(db: sqlite_utils.Database, table: str, pk: Any) -> dict | None:
        try:
            return _decode(table, db[table].get(pk))
        except NotFoundError:
            return None

    @staticmethod
    def _rows(db: sqlite_utils.Database, table: str, where: dict, order_by: str, limit=None) -> list[dict]:
        # where: column -> value; None values mean "no filter on that column".
        clauses = {column: value for column, value in where.items() if value is not None}
        sql = " AND ".join(f"[{column}] = ?" for column in clauses) or None
        rows = db[table].rows_where(sql, list(clauses.values()), order_by=order_by, limit=limit)
        return [_decode(table, row) for row in rows]

    def _update(self, table: str, pk: Any, changes: dict, what: str) -> None:
        def fn(db: sqlite_utils.Database) -> None:
            try:
                db[table].update(pk, changes)
            except NotFoundError:
                raise KeyError(f"{what}: no {table} row with id {pk!r}") from None

        self._write(fn, what)

    # ---- runs

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
                "host": socket.gethostname(),
            }
            db["runs"].update(run_id, changes)
            return self._get(db, "runs", run_id)

        return self._write(fn, f"cannot reopen run {run_id!r}")

    def recover_crashed_runs(self) -> list[str]:
        """Runs marked `running` whose process on this host is gone (killed, crashed) are marked
        `failed`, and each command they left pending or running is journaled `failed` with the reason,
        so none waits forever. Returns their ids. Runs of other hosts are left alone (their processes
        cannot be seen from here)."""
        host = socket.gethostname()

        def fn(db: sqlite_utils.Database) -> list[str]:
            crashed = []
            for run in self._rows(db, "runs", {"status": "running", "host": host}, "created_at"):
                if run["pid"] is None or _process_alive(run["pid"]):
                    continue
                now, why = time.time(), f"the run crashed (its process {run['pid']} is gone)"
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

    # ---- the command journal

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

    # ---- supervisor decisions

    def add_decision(
        self,
        run_id: str,
        step: int,
        agent: str,
        action: str,
        explanation: str = "",
        strategy: str | None = None,
        model: str | None = None,
        observation: Any = None,
        raw_output: str | None = None,
        lr_before: float | None = None,
        lr_after: float | None = None,
        latency_s: float | None = None,
        fallback: bool = False,
        key: str | None = None,
        retry_of: int | None = None,
    ) -> int:
        """Stores a decision; returns its id. With a `key` this run has seen before, nothing is added
        and the first decision's id is returned (a supervisor that died after recording it)."""
        row = {
            "run_id": run_id,
            "step": _int(step, "decision step"),
            "agent": _text(agent, "decision agent"),
            "strategy": strategy,
            "model": model,
            "observation": _json(observation, "decision observation"),
            "raw_output": raw_output,
            "action": _text(action, "decision action"),
            "explanation": explanation or "",
            "lr_before": _optional_number(lr_before, "lr_before"),
            "lr_after": _optional_number(lr_after, "lr_after"),
            "latency_s": _optional_number(latency_s, "latency_s"),
            "fallback": _flag(fallback, "fallback"),
            "created_at": time.time(),
            "key": _optional_text(key, "decision key"),
            "retry_of": None if retry_of is None else _int(retry_of, "retry_of"),
        }

        def fn(db: sqlite_utils.Database) -> int:
            if key is not None:
                first = self._rows(db, "decisions", {"run_id": run_id, "key": key}, "id", 1)
                if first:
                    return first[0]["id"]
            return db["decisions"].insert(row).last_pk

        return self._write(fn, f"cannot add decision to run {run_id!r}")

    def get_decision(self, run_id: str, key: str) -> dict | None:
        """The decision stored under `key` in this run, if any."""
        rows = self._read(lambda db: self._rows(db, "decisions", {"run_id": run_id, "key": key}, "id", 1))
        return rows[0] if rows else None

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
            lambda db: [
                _decode("decisions", row)
                for row in db["decisions"].rows_where(
                    " AND ".join(where), args, order_by="id DESC", limit=limit
                )
            ]
        )

    def list_decisions(
        self, run_id: str | None = None, *, after_id: int | None = None, limit: int | None = None
    ) -> list[dict]:
        """Decisions of a run (of all runs when run_id is None) in the order they were made; with
        after_id or limit (paging) in the order of their ids."""
        if after_id is None and limit is None:
            return self._read(lambda db: self._rows(db, "decisions", {"run_id": run_id}, "created_at, id"))
        where, args = ["id > ?"], [_int(after_id or 0, "after_id")]
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        return self._read(
            lambda db: [
                _decode("decisions", row)
                for row in db["decisions"].rows_where(" AND ".join(where), args, order_by="id", limit=limit)
            ]
        )

    # ---- self-correction episodes

    def add_episode(
        self,
        task: str,
        task_id: Any = None,
        strategy: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        run_id: str | None = None,
    ) -> int:
        row = {
            "run_id": run_id,
            "task": _text(task, "episode task"),
            # Tasks name their items with ints (Countdown) or strings (BFCL): one column, as text.
            "task_id": None if task_id is None else str(task_id),
            "strategy": strategy,
            "model": model,
            "seed": _optional_int(seed, "episode seed"),
            "status": "running",
            "created_at": time.time(),
        }
        return self._write(lambda db: db["episodes"].insert(row).last_pk, f"cannot add {task!r} episode")

    def finish_episode(self, episode_id: int, status: str, passed_first: bool, passed_final: bool) -> None:
        changes = {
            "status": _text(status, "episode status"),
            "passed_first": _flag(passed_first, "passed_first"),
            "passed_final": _flag(passed_final, "passed_final"),
            "finished_at": time.time(),
        }
        self._update("episodes", episode_id, changes, f"cannot finish episode {episode_id!r}")

    def add_attempt(
        self, episode_id: int, attempt_index: int, prompt: str, response: str, passed: bool, reason: str = ""
    ) -> int:
        row = {
            "episode_id": episode_id,
            "attempt_index": _int(attempt_index, "attempt_index"),
            "prompt": str(prompt),
            "response": str(response),
            "passed": _flag(passed, "passed"),
            "reason": reason or "",
            "created_at": time.time(),
        }
        return self._write(
            lambda db: db["attempts"].insert(row).last_pk,
            f"cannot add attempt {attempt_index!r} to episode {episode_id!r}",
        )

    def add_reflection(
        self,
        episode_id: int,
        after_attempt: int,
        text: str,
        n_tokens: int | None = None,
        reward: float | None = None,
    ) -> int:
        row = {
            "episode_id": episode_id,
            "after_attempt": _int(after_attempt, "after_attempt"),
            "text": str(text),
            "n_tokens": _optional_int(n_tokens, "n_tokens"),
            "reward": _optional_number(reward, "reflection reward"),
            "created_at": time.time(),
        }
        return self._write(
            lambda db: db["reflections"].insert(row).last_pk,
            f"cannot add reflection to episode {episode_id!r}",
        )

    def set_reflection_reward(self, reflection_id: int, reward: float) -> None:
        self._update(
            "reflections",
            reflection_id,
            {"reward": _number(reward, "reflection reward")},
            f"cannot reward reflection {reflection_id!r}",
        )

    def get_episode(self, episode_id: int) -> dict | None:
        """The episode with its "attempts" (by attempt_index) and "reflections" (by after_attempt)."""

        def fn(db: sqlite_utils.Database) -> dict | None:
            episode = self._get(db, "episodes", episode_id)
            if episode is not None:
                episode["attempts"] = self._rows(
                    db, "attempts", {"episode_id": episode_id}, "attempt_index, id"
                )
                episode["reflections"] = self._rows(
                    db, "reflections", {"episode_id": episode_id}, "after_attempt, id"
                )
            return episode

        return self._read(fn)

    def list_episodes(self, run_id: str | None = None, task: str | None = None) -> list[dict]:
        """Episode rows (without attempts and reflections) in the order they were added."""
        return self._read(
            lambda db: self._rows(db, "episodes", {"run_id": run_id, "task": task}, "created_at, id")
        )
