"""The store on real SQLite files: round trips, schema migrations, and many writers at once (threads and
processes)."""

import math
import os
import sqlite3
import threading
import time

import pytest
from helpers.store_children import run_children
from pydantic import ValidationError

from selfsteer.trainer_bridge.records import EpisodeAttempt, EpisodeReflection, NewDecision, NewEpisode
from selfsteer.trainer_bridge.store import (
    DEFAULT_DB_PATH,
    MIGRATIONS,
    Store,
    StoreError,
    connect,
    migrate,
    schema,
)
from selfsteer.trainer_bridge.store.runs import process_start


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.sqlite") as s:
        yield s


def raw(path):
    """A plain sqlite3 connection, to look at the file without going through the store."""
    return sqlite3.connect(str(path), isolation_level=None)


def table_names(path):
    conn = raw(path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()


# -----------------------------------------------------------------------------
# opening


def test_open_creates_parent_dir_uses_wal_and_migrates(tmp_path):
    path = tmp_path / "a" / "b" / "store.sqlite"
    with Store(path) as s:
        assert s.path == path and path.exists()
        assert s.schema_version == len(MIGRATIONS) == 5
        assert s.applied_migrations == len(MIGRATIONS)
    conn = raw(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()
    assert {"runs", "metrics", "commands", "decisions", "episodes", "attempts", "reflections"} <= table_names(
        path
    )
    # Reopening finds nothing to do.
    with Store(path) as s:
        assert s.applied_migrations == 0


def test_connections_wait_for_locks():
    # connect() is what every thread and process of the store opens with.
    db = connect(":memory:")
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    db.close()


def test_default_path_is_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Store() as s:
        assert str(s.path) == DEFAULT_DB_PATH == "selfsteer.sqlite"
    assert (tmp_path / "selfsteer.sqlite").exists()


def test_refuses_memory_and_garbage_files(tmp_path):
    with pytest.raises(StoreError, match="file path"):
        Store(":memory:")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(garbage)


def test_closed_store_refuses_work(tmp_path):
    s = Store(tmp_path / "store.sqlite")
    run_id = s.create_run("r")
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_run(run_id)
    with Store(tmp_path / "store.sqlite") as s:
        assert s.get_run(run_id)["name"] == "r"


# -----------------------------------------------------------------------------
# round trips


def test_runs_round_trip(store):
    config = {"model": {"n_layer": 2}, "training": {"learning_rate": 5e-3}, "tags": ["a", "b"]}
    parent = store.create_run("baseline", config=config)
    child = store.create_run("branch", kind="reflect", parent_run_id=parent)

    run = store.get_run(parent)
    assert run["id"] == parent and len(parent) == 32
    assert run["name"] == "baseline" and run["kind"] == "train" and run["status"] == "running"
    assert run["config"] == config
    assert run["summary"] is None and run["finished_at"] is None
    assert store.get_run(child)["parent_run_id"] == parent and store.get_run(child)["config"] is None
    assert store.get_run("no-such-run") is None

    store.finish_run(parent, summary={"final_eval_loss": 2.35, "steps": 300})
    run = store.get_run(parent)
    assert run["status"] == "finished" and run["summary"] == {"final_eval_loss": 2.35, "steps": 300}
    assert run["finished_at"] >= run["created_at"]
    store.finish_run(child, status="stopped")
    assert store.get_run(child)["status"] == "stopped"

    with pytest.raises(StoreError, match="already finished"):
        store.finish_run(parent, status="failed")
    assert store.get_run(parent)["status"] == "finished"
    with pytest.raises(StoreError):
        store.finish_run(store.create_run("x"), status="done")
    with pytest.raises(KeyError):
        store.finish_run("no-such-run")
    with pytest.raises(StoreError, match="cannot create run"):
        store.create_run("orphan", parent_run_id="no-such-run")
    with pytest.raises(StoreError):
        store.create_run("")


def test_list_runs_newest_first(store):
    ids = [store.create_run(f"r{i}", kind="reflect" if i % 2 else "train") for i in range(5)]
    assert [r["id"] for r in store.list_runs()] == ids[::-1]
    assert [r["id"] for r in store.list_runs(kind="reflect")] == [ids[3], ids[1]]
    assert [r["id"] for r in store.list_runs(limit=2)] == [ids[4], ids[3]]


def test_metrics_round_trip(store):
    run = store.create_run("r")
    other = store.create_run("other")
    added = store.add_metrics(
        run,
        [
            {"step": 2, "name": "loss", "value": 2.5},
            {"step": 1, "name": "loss", "value": 3.0, "time": 100.0},
            {"step": 1, "name": "lr", "value": 1e-3},
            {"step": 2, "name": "loss", "value": 2.9, "branch": "lr-halved"},
            {"step": 3, "name": "loss", "value": float("nan")},
            {"step": 3, "name": "grad_norm", "value": float("inf")},
        ],
    )
    assert added == 6
    store.add_metrics(other, [{"step": 1, "name": "loss", "value": 9.0}])

    rows = store.get_metrics(run)
    assert [(r["step"], r["name"], r["branch"]) for r in rows] == [
        (1, "loss", "main"),
        (1, "lr", "main"),
        (2, "loss", "main"),
        (2, "loss", "lr-halved"),
        (3, "loss", "main"),
        (3, "grad_norm", "main"),
    ]
    assert rows[0]["value"] == 3.0 and rows[0]["time"] == 100.0 and rows[0]["run_id"] == run
    assert rows[2]["time"] > 1e9  # defaults to now
    # A diverged loss must reach the supervisor as NaN, not vanish.
    assert math.isnan(rows[4]["value"]) and rows[5]["value"] == math.inf

    assert [r["step"] for r in store.get_metrics(run, since_step=2)] == [3, 3]
    assert [r["value"] for r in store.get_metrics(run, names="lr")] == [1e-3]
    assert len(store.get_metrics(run, names=["lr", "grad_norm"])) == 2
    assert [r["value"] for r in store.get_metrics(run, branch="lr-halved")] == [2.9]
    assert store.get_metrics(run, since_step=1, names=["loss"], branch="main")[0]["value"] == 2.5
    assert [r["value"] for r in store.get_metrics(other)] == [9.0]
    assert store.get_metrics("no-such-run") == []


@pytest.mark.parametrize(
    "bad_row",
    [
        {"step": 1, "name": "loss"},  # no value
        {"step": 1, "name": "loss", "value": None},
        {"step": 1, "name": "loss", "value": "2.5"},
        {"step": 1.5, "name": "loss", "value": 2.5},
        {"step": 1, "name": "", "value": 2.5},
        {"step": 1, "name": "loss", "value": 2.5, "stpe": 1},
    ],
)
def test_bad_metric_rows_add_nothing(store, bad_row):
    run = store.create_run("r")
    with pytest.raises(StoreError):
        store.add_metrics(run, [{"step": 0, "name": "loss", "value": 1.0}, bad_row])
    assert store.get_metrics(run) == []


def test_metrics_for_unknown_run_add_nothing(store):
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_metrics("no-such-run", [{"step": 0, "name": "loss", "value": 1.0}])
    conn = raw(store.path)
    assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 0
    conn.close()


def test_commands_round_trip(store):
    run = store.create_run("r")
    first = store.add_command(run, "set_optimizer", {"lr": 2e-3, "betas": [0.9, 0.95]}, "api")
    assert first["status"] == "pending" and first["args"] == {"lr": 2e-3, "betas": [0.9, 0.95]}
    assert first["run_id"] == run and first["type"] == "set_optimizer" and first["source"] == "api"
    assert first["step"] is None and first["result"] is None and first["error"] is None
    assert first["created_at"] == first["updated_at"]
    second = store.add_command(run, "pause", None, "agent:llm", uuid="my-uuid")
    assert second["uuid"] == "my-uuid" and second["args"] == {}
    assert store.get_command(first["uuid"]) == first
    assert store.get_command("nope") is None

    running = store.update_command(first["uuid"], "running", step=120)
    assert running["status"] == "running" and running["step"] == 120
    assert running["updated_at"] >= first["updated_at"]
    done = store.update_command(first["uuid"], "success", result={"lr_before": 1e-3, "lr_after": 2e-3})
    assert done["status"] == "success" and done["step"] == 120  # kept when not given
    assert done["result"] == {"lr_before": 1e-3, "lr_after": 2e-3}
    assert store.get_command(first["uuid"]) == done

    failed = store.update_command("my-uuid", "failed", error="run is not training")
    assert failed["status"] == "failed" and failed["error"] == "run is not training"

    third = store.add_command(run, "evaluate", {}, "dashboard")
    assert [c["uuid"] for c in store.list_commands(run)] == [first["uuid"], "my-uuid", third["uuid"]]
    assert [c["uuid"] for c in store.list_commands(run, status="pending")] == [third["uuid"]]
    assert len(store.list_commands(None)) == 3


def test_command_transitions(store):
    run = store.create_run("r")
    uuid = store.add_command(run, "pause", {}, "api")["uuid"]
    for illegal in ("pending", "success"):
        with pytest.raises(StoreError, match="cannot go from 'pending'"):
            store.update_command(uuid, illegal, step=5)
    store.update_command(uuid, "running", step=3)
    before = store.get_command(uuid)
    for illegal in ("pending", "running"):
        with pytest.raises(StoreError):
            store.update_command(uuid, illegal, step=99, result={"x": 1}, error="e")
    assert store.get_command(uuid) == before  # an illegal move changes nothing
    store.update_command(uuid, "success")
    after = store.get_command(uuid)
    for illegal in ("pending", "running", "success", "failed"):
        with pytest.raises(StoreError):
            store.update_command(uuid, illegal, step=99)
    assert store.get_command(uuid) == after

    with pytest.raises(StoreError, match="status must be one of"):
        store.update_command(uuid, "done")
    with pytest.raises(KeyError):
        store.update_command("no-such-command", "running")


def test_bad_commands_are_refused(store):
    run = store.create_run("r")
    with pytest.raises(StoreError, match="JSON"):
        store.add_command(run, "set_optimizer", {"lr": float("nan")}, "api")
    with pytest.raises(StoreError, match="JSON"):
        store.add_command(run, "set_optimizer", {"lr": object()}, "api")
    with pytest.raises(StoreError, match="dict"):
        store.add_command(run, "set_optimizer", [1, 2], "api")
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_command("no-such-run", "pause", {}, "api")
    assert store.list_commands(None) == []
    store.add_command(run, "pause", {}, "api", uuid="dup")
    with pytest.raises(StoreError, match="UNIQUE"):
        store.add_command(run, "resume", {}, "api", uuid="dup")
    uuid = store.add_command(run, "pause", {}, "api")["uuid"]
    store.update_command(uuid, "running")
    with pytest.raises(StoreError, match="JSON"):
        store.update_command(uuid, "success", result={"loss": object()})
    assert store.get_command(uuid)["status"] == "running"
    # A result is a fact about what was applied: NaN or inf in it is kept as null, never refused.
    done = store.update_command(uuid, "success", result={"loss": float("inf"), "lr": [float("nan"), 1.0]})
    assert done["status"] == "success" and done["result"] == {"loss": None, "lr": [None, 1.0]}


def test_a_diverged_run_finishes_with_its_nan_as_null(store):
    run = store.create_run("r")
    store.finish_run(run, summary={"final_eval_loss": float("nan"), "best_eval_loss": 2.5})
    assert store.get_run(run)["summary"] == {"final_eval_loss": None, "best_eval_loss": 2.5}


def test_json_with_nan_is_refused_everywhere(store):
    with pytest.raises(StoreError, match="JSON"):
        store.create_run("r", config={"lr": float("nan")})
    run = store.create_run("r")
    with pytest.raises(ValidationError, match="JSON"):  # the record refuses it before the store sees it
        store.add_decision(
            run, NewDecision(step=1, agent="llm", action="keep", observation={"loss": float("nan")})
        )
    assert store.list_runs() == [store.get_run(run)] and store.get_run(run)["status"] == "running"
    assert store.list_decisions() == []


def test_decisions_round_trip(store):
    run = store.create_run("r")
    observation = {"step": 100, "losses": [3.1, 2.9], "lr": 5e-3}
    first = store.add_decision(
        run,
        NewDecision(
            step=100,
            agent="llm",
            action="halve",
            explanation="loss is oscillating",
            strategy="cot-v1",
            model="SmolLM2-135M-Instruct",
            observation=observation,
            raw_output='{"action": "halve"}',
            lr_before=5e-3,
            lr_after=2.5e-3,
            latency_s=0.8,
        ),
    )
    second = store.add_decision(run, NewDecision(step=200, agent="rule", action="keep", fallback=True))
    assert isinstance(first, int) and second > first

    decisions = store.list_decisions(run)
    assert [d["id"] for d in decisions] == [first, second]
    d = decisions[0]
    assert (d["step"], d["agent"], d["action"], d["explanation"]) == (
        100,
        "llm",
        "halve",
        "loss is oscillating",
    )
    assert (d["strategy"], d["model"], d["raw_output"]) == (
        "cot-v1",
        "SmolLM2-135M-Instruct",
        '{"action": "halve"}',
    )
    assert d["observation"] == observation
    assert (d["lr_before"], d["lr_after"], d["latency_s"]) == (5e-3, 2.5e-3, 0.8)
    assert d["fallback"] is False and d["outcome"] is None
    assert decisions[1]["fallback"] is True and decisions[1]["explanation"] == ""

    store.set_decision_outcome(first, {"loss_after_50_steps": 2.4, "improved": True})
    assert store.list_decisions(run)[0]["outcome"] == {"loss_after_50_steps": 2.4, "improved": True}
    with pytest.raises(KeyError):
        store.set_decision_outcome(12345, {})
    other = store.create_run("other")
    store.add_decision(other, NewDecision(step=1, agent="human", action="double"))
    assert len(store.list_decisions()) == 3 and len(store.list_decisions(other)) == 1
    with pytest.raises(StoreError, match="NewDecision"):
        store.add_decision(run, {"step": 1, "agent": "llm", "action": "keep"})
    with pytest.raises(ValidationError):
        NewDecision(step=1, agent="llm", action="")


def attempt(index, prompt, response, passed, reason=""):
    return EpisodeAttempt(attempt_index=index, prompt=prompt, response=response, passed=passed, reason=reason)


def test_episodes_round_trip(store):
    run = store.create_run("reflect", kind="reflect")
    episode = store.add_episode(
        NewEpisode(task="countdown", task_id=17, strategy="reflect-v1", model="m", seed=3, run_id=run)
    )
    store.add_attempt(episode, attempt(0, "make 24 from 3 4 5 6", "3*4+5+6", False, reason="= 23, not 24"))
    reflection = store.add_reflection(
        episode, EpisodeReflection(after_attempt=0, text="I added instead of multiplying.", n_tokens=9)
    )
    store.add_attempt(episode, attempt(1, "make 24 ... (with reflection)", "(6-5+3)*6", True))
    store.set_reflection_reward(reflection, 1.0)
    store.finish_episode(episode, "finished", passed_first=False, passed_final=True)

    got = store.get_episode(episode)
    assert (got["task"], got["task_id"], got["strategy"], got["model"], got["seed"]) == (
        "countdown",
        "17",  # task ids are text: BFCL's are strings, Countdown's ints
        "reflect-v1",
        "m",
        3,
    )
    assert got["run_id"] == run and got["status"] == "finished"
    assert got["passed_first"] is False and got["passed_final"] is True
    assert got["finished_at"] >= got["created_at"]
    assert [(a["attempt_index"], a["passed"], a["reason"]) for a in got["attempts"]] == [
        (0, False, "= 23, not 24"),
        (1, True, ""),
    ]
    assert (
        got["attempts"][0]["prompt"] == "make 24 from 3 4 5 6"
        and got["attempts"][1]["response"] == "(6-5+3)*6"
    )
    [r] = got["reflections"]
    assert (r["id"], r["after_attempt"], r["text"], r["n_tokens"], r["reward"]) == (
        reflection,
        0,
        "I added instead of multiplying.",
        9,
        1.0,
    )

    loose = store.add_episode(NewEpisode(task="bfcl:simple_python", task_id="simple_python_12"))
    fresh = store.get_episode(loose)
    assert fresh["run_id"] is None and fresh["status"] == "running" and fresh["passed_first"] is None
    assert fresh["attempts"] == [] and fresh["reflections"] == []
    assert store.get_episode(999) is None

    assert [e["id"] for e in store.list_episodes()] == [episode, loose]
    assert [e["id"] for e in store.list_episodes(run_id=run)] == [episode]
    assert [e["id"] for e in store.list_episodes(task="bfcl:simple_python")] == [loose]
    assert "attempts" not in store.list_episodes()[0]


def test_bad_episode_input(store):
    episode = store.add_episode(NewEpisode(task="countdown"))
    store.add_attempt(episode, attempt(0, "p", "r", False))
    with pytest.raises(StoreError, match="UNIQUE"):
        store.add_attempt(episode, attempt(0, "p", "r", True))
    with pytest.raises(ValidationError, match="boolean"):  # the record refuses it before the store sees it
        attempt(1, "p", "r", "yes")
    with pytest.raises(StoreError, match="EpisodeAttempt"):
        store.add_attempt(episode, {"attempt_index": 1, "prompt": "p", "response": "r", "passed": True})
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_attempt(999, attempt(0, "p", "r", True))
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_reflection(999, EpisodeReflection(after_attempt=0, text="text"))
    with pytest.raises(KeyError):
        store.set_reflection_reward(999, 1.0)
    with pytest.raises(KeyError):
        store.finish_episode(999, "finished", True, True)
    assert len(store.get_episode(episode)["attempts"]) == 1


# -----------------------------------------------------------------------------
# migrations


def _v2_add_run_tags(conn):
    # A made-up next version: a new column with a default, and a new table.
    conn.execute("ALTER TABLE runs ADD COLUMN tag TEXT NOT NULL DEFAULT 'untagged'")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, run_id TEXT REFERENCES runs(id), text TEXT)")


def test_file_from_version_zero_is_migrated_on_open(tmp_path):
    path = tmp_path / "old.sqlite"
    db = connect(path)
    assert migrate(db.conn, target=0) == 0
    db.close()
    assert "runs" not in table_names(path)
    with Store(path) as s:
        assert s.applied_migrations == s.schema_version == len(MIGRATIONS)
        s.create_run("r")


def test_older_file_is_brought_forward_and_keeps_its_data(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", [*MIGRATIONS, _v2_add_run_tags])
    path = tmp_path / "old.sqlite"
    db = connect(path)
    assert migrate(db.conn, target=1) == 1  # only MIGRATIONS[:1]
    db.conn.execute(
        "INSERT INTO runs (id, name, kind, config, status, created_at) VALUES ('r1', 'old', 'train', '{\"lr\": 1}', "
        "'finished', 1.0)"
    )
    db.conn.execute(
        "INSERT INTO metrics (run_id, step, name, value, time) VALUES ('r1', 7, 'loss', 2.0, 1.0)"
    )
    db.close()

    with Store(path) as s:  # a version-1 file: the released migrations, then the test's own
        assert s.applied_migrations == len(MIGRATIONS) and s.schema_version == len(MIGRATIONS) + 1
        run = s.get_run("r1")
        assert run["name"] == "old" and run["config"] == {"lr": 1} and run["tag"] == "untagged"
        assert run["pid"] is None  # version 2's columns, empty for an old run
        assert [(m["step"], m["value"]) for m in s.get_metrics("r1")] == [(7, 2.0)]
        s.create_run("new")
    assert "notes" in table_names(path)


def test_failed_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "store.sqlite"
    with Store(path) as s:
        run = s.create_run("r")

    def broken_v2(conn):
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("ALTER TABLE runs ADD COLUMN tag TEXT")
        raise RuntimeError("bug in migration 2")

    monkeypatch.setattr(schema, "MIGRATIONS", [*MIGRATIONS, broken_v2])
    with pytest.raises(RuntimeError, match="bug in migration 2"):
        Store(path)
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert "tag" not in [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
    conn.close()
    assert "half_done" not in table_names(path)

    monkeypatch.setattr(schema, "MIGRATIONS", MIGRATIONS)
    with Store(path) as s:
        assert s.get_run(run)["name"] == "r"


def test_newer_file_asks_for_an_upgrade(tmp_path):
    path = tmp_path / "future.sqlite"
    with Store(path) as s:
        run = s.create_run("r")
    conn = raw(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="upgrade selfsteer"):
        Store(path)
    conn = raw(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) + 1
    assert conn.execute("SELECT name FROM runs WHERE id = ?", (run,)).fetchone() == ("r",)
    conn.close()


def test_migrate_refuses_unknown_targets(tmp_path):
    db = connect(tmp_path / "s.sqlite")
    with pytest.raises(StoreError):
        migrate(db.conn, target=len(MIGRATIONS) + 1)
    with pytest.raises(StoreError):
        migrate(db.conn, target=-1)
    db.close()


def test_migration_is_decided_again_under_the_write_lock(tmp_path):
    # Another process migrates a fresh file and has not committed yet: the opener reads version 0,
    # waits for the write lock, and must then see version 1 and run nothing (running migration 1 again
    # would fail on "table runs already exists").
    path = tmp_path / "race.sqlite"
    holder = connect(path)
    holder.conn.execute("PRAGMA user_version = 0")  # writes the header, so the file is in WAL for everyone
    holder.conn.execute("BEGIN IMMEDIATE")
    for migration in MIGRATIONS:
        migration(holder.conn)
    holder.conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    opened, errors = [], []

    def open_store():
        try:
            opened.append(Store(path))
        except Exception as exc:  # surfaced by the asserts below
            errors.append(exc)

    opener = threading.Thread(target=open_store)
    start = time.monotonic()
    opener.start()
    time.sleep(0.5)
    holder.conn.execute("COMMIT")
    opener.join(timeout=30)
    holder.close()
    assert not errors, errors
    assert time.monotonic() - start >= 0.5  # it did wait for the lock
    [s] = opened
    assert s.applied_migrations == 0 and s.schema_version == len(MIGRATIONS)
    s.close()


# -----------------------------------------------------------------------------
# crashed runs


@pytest.mark.skipif(process_start(os.getpid()) is None, reason="process start times come from /proc")
def test_a_run_whose_pid_went_to_another_process_is_recovered_as_crashed(store):
    """A pid outlives its process: the kernel hands it on. A run whose pid is alive but whose process
    started at another time is the run of a process that is gone."""
    alive = store.create_run("alive")  # this process, this start time: alive
    reused = store.create_run("reused")
    legacy = store.create_run("legacy")  # from a version of the file without start times
    started = store.get_run(alive)["process_start"]
    assert started == process_start(os.getpid())
    command = store.add_command(reused, "pause", {}, "test")["uuid"]
    conn = raw(store.path)
    conn.execute("UPDATE runs SET process_start = ? WHERE id = ?", (started - 1, reused))
    conn.execute("UPDATE runs SET process_start = NULL WHERE id = ?", (legacy,))
    conn.close()

    assert store.recover_crashed_runs() == [reused]
    run = store.get_run(reused)
    assert run["status"] == "failed" and "now another process's" in run["summary"]["error"]
    assert store.get_command(command)["status"] == "failed"
    assert store.get_run(alive)["status"] == store.get_run(legacy)["status"] == "running"
    assert store.recover_crashed_runs() == []


# -----------------------------------------------------------------------------
# concurrent writers


def test_eight_threads_write_at_once(store):
    run = store.create_run("busy")
    n_threads, n_each = 8, 200
    barrier = threading.Barrier(n_threads + 1)
    errors = []

    def writer(t):
        try:
            barrier.wait()
            for i in range(n_each):
                command = store.add_command(run, "set_optimizer", {"lr": i}, f"thread-{t}")
                store.add_metrics(run, [{"step": i, "name": f"thread-{t}", "value": float(i)}])
                if i % 2:
                    store.update_command(command["uuid"], "running", step=i)
        except Exception as exc:
            errors.append(exc)

    def reader():
        try:
            barrier.wait()
            while any(t.is_alive() for t in threads):
                store.get_metrics(run, since_step=n_each - 5)
                store.list_commands(run, status="running")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    reading = threading.Thread(target=reader)
    reading.start()
    for t in threads:
        t.join(timeout=60)
    reading.join(timeout=60)
    assert not errors, errors[:3]

    commands = store.list_commands(run)
    assert len(commands) == n_threads * n_each == len({c["uuid"] for c in commands})
    assert len(store.list_commands(run, status="running")) == n_threads * n_each // 2
    for t in range(n_threads):
        rows = store.get_metrics(run, names=[f"thread-{t}"])
        assert [r["step"] for r in rows] == list(range(n_each))
        assert sorted(c["args"]["lr"] for c in commands if c["source"] == f"thread-{t}") == list(
            range(n_each)
        )


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    with Store(path) as s:
        run = s.create_run("shared")
    reports = run_children(tmp_path, "write", path, extra=[run])
    assert reports == [{"written": 300}, {"written": 300}]
    with Store(path) as s:
        commands = s.list_commands(run)
        assert len(commands) == 600 == len({c["uuid"] for c in commands})
        assert all(c["status"] == "success" and c["result"] == {"i": c["step"]} for c in commands)
        for tag in ("proc-a", "proc-b"):
            assert [m["step"] for m in s.get_metrics(run, names=[tag])] == list(range(300))
            assert sorted(c["step"] for c in commands if c["source"] == tag) == list(range(300))


def test_two_processes_open_a_new_file_at_once(tmp_path):
    path = tmp_path / "fresh.sqlite"
    reports = run_children(tmp_path, "open", path)
    assert all(r["version"] == len(MIGRATIONS) for r in reports)
    assert sorted(r["applied"] for r in reports) == [0, len(MIGRATIONS)]  # migrated exactly once
    with Store(path) as s:
        assert s.applied_migrations == 0
        s.create_run("after the race")
