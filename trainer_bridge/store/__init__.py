"""The selfsteer store: one SQLite file for runs, metrics, the command journal, agent decisions and
self-correction episodes. `Store` is one class made of a part per subsystem:

- schema.py: the one owner of the tables: `connect`, the migrations, `migrate`;
- errors.py: `StoreError`, and the retry of a database that stays locked;
- checks.py: rows come in as their records (trainer_bridge/records.py); the checks of the other
  arguments, and JSON in and out of the columns;
- base.py: one connection per thread, short transactions, the row helpers (`StoreBase`);
- runs.py: runs, their metrics, crash recovery (tables runs, metrics);
- journal.py: the command journal (table commands);
- decisions.py: supervisor decisions and their reflections (table decisions);
- episodes.py: reflect episodes, their attempts and reflections (episodes, attempts, reflections).
"""

from selfsteer.trainer_bridge.store.base import DEFAULT_DB_PATH
from selfsteer.trainer_bridge.store.decisions import DecisionsMixin
from selfsteer.trainer_bridge.store.episodes import EpisodesMixin
from selfsteer.trainer_bridge.store.errors import StoreError
from selfsteer.trainer_bridge.store.journal import JournalMixin
from selfsteer.trainer_bridge.store.runs import RunsMixin
from selfsteer.trainer_bridge.store.schema import MIGRATIONS, connect, migrate

__all__ = [
    "DEFAULT_DB_PATH",
    "MIGRATIONS",
    "Store",
    "StoreError",
    "connect",
    "migrate",
]


class Store(RunsMixin, JournalMixin, DecisionsMixin, EpisodesMixin):
    """Thread-safe and process-safe access to the selfsteer SQLite file. Rows go in as records and come
    out as plain dicts (the control server's response models check what goes out)."""
