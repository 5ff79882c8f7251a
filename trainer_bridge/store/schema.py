"""The one owner of the store's schema: how the file is opened (`connect`), the tables
(MIGRATIONS) and bringing a file up to date (`migrate`). Nothing else creates or alters tables.

The schema version lives in `PRAGMA user_version`. MIGRATIONS[i] takes the schema from version i to
i + 1 and is never edited once released: a schema change is a new function appended to the list.
Times are unix seconds (float); JSON columns are TEXT.
"""

from __future__ import annotations

import operator
import os
import sqlite3
from collections.abc import Callable

import sqlite_utils

from selfsteer.trainer_bridge.store.errors import StoreError, retry_locked

BUSY_TIMEOUT_S = 30.0


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


def _v4_decision_command(conn: sqlite3.Connection) -> None:
    # The command that carried a decision out: its step is where the decision took effect (applied_step),
    # which for a supervisor that does not hold the run is tens of steps after the step it observed.
    conn.execute("ALTER TABLE decisions ADD COLUMN command TEXT REFERENCES commands(uuid)")


def _v5_run_process_start(conn: sqlite3.Connection) -> None:
    # A pid alone outlives its process: once the run's process is gone the kernel may give the pid to
    # another, and the run would look alive forever. The pid with its start time names one process.
    conn.execute("ALTER TABLE runs ADD COLUMN process_start INTEGER")


# Append only. A migration gets a connection inside an open transaction and must not commit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1_initial_schema,
    _v2_idempotency_and_run_owner,
    _v3_self_correction,
    _v4_decision_command,
    _v5_run_process_start,
]


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

    return retry_locked(run, "migrating the schema")


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
        retry_locked(db.enable_wal, "switching to WAL")
        # In WAL, NORMAL never corrupts the file; a power cut may lose the last commits, not tear them.
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return db
