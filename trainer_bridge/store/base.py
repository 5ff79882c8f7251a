"""The plumbing under every part of the Store: one connection per thread, short transactions, and
the row helpers (_get, _rows, _update) the parts share.

Many writers share the file at once: the trainer callback, the control server's threads, supervisor
agents and scripts in other processes. Hence:
- WAL, so readers never block the writer and the writer never blocks readers;
- a 30 s busy timeout, so a writer waits for another instead of failing;
- short `BEGIN IMMEDIATE` write transactions: they take the write lock up front. A transaction that
  reads first and writes later must upgrade its lock, and in WAL that upgrade fails at once with
  "database is locked" when another writer got in between, whatever the busy timeout;
- one connection per thread (a sqlite3 connection must not be used by two threads at once), and one
  write lock per process, so that threads queue on a Python lock instead of polling SQLite's;
- a few retries on "database is locked" for what the timeout does not cover (errors.retry_locked).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import sqlite_utils
from sqlite_utils.db import NotFoundError

from selfsteer.trainer_bridge.store.checks import _decode
from selfsteer.trainer_bridge.store.errors import StoreError, retry_locked
from selfsteer.trainer_bridge.store.schema import connect, migrate

DEFAULT_DB_PATH = "selfsteer.sqlite"


class StoreBase:
    """The file opened (and migrated) once, a connection per thread, and fn(db) run in a transaction."""

    def __init__(self, path: str | os.PathLike = DEFAULT_DB_PATH):
        if str(path) in ("", ":memory:"):
            # Every thread has its own connection, and each would get its own empty in-memory database.
            raise StoreError("the store needs a file path, not an in-memory database")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards _connections and _closed
        self._closed = False
        self.transactions = 0  # how many this object ran (benchmarks: what steering costs the file)
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

    def __enter__(self) -> Self:
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
        self.transactions += 1

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
                return retry_locked(run, what)
            with self._write_lock:
                return retry_locked(run, what)
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
