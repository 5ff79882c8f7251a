"""What goes wrong in the store: `StoreError`, and a database that stays locked.

The busy timeout (30 s, set by `connect`) makes a writer wait for another; what still comes back as
"locked" is mostly a lock that SQLite refuses to wait for (WAL recovery, a journal-mode switch).
`retry_locked` backs off and retries that, LOCK_RETRIES times, then gives up with a StoreError.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import tenacity

LOCK_RETRIES = 5


class StoreError(Exception):
    """Bad input, a file this code cannot use, or a database that stayed locked."""


def _is_locked(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


# Retry k (k = 0..4) waits uniform(0.02, 0.1) * 2**k seconds: a fixed 0.02 * 2**k plus a jitter of
# up to 0.08 * 2**k. At most 3.1 s of waiting over the 5 retries. Tenacity keeps its state per thread.
_LOCKED = tenacity.Retrying(
    retry=tenacity.retry_if_exception(_is_locked),
    wait=tenacity.wait_exponential(multiplier=0.02) + tenacity.wait_random_exponential(multiplier=0.08),
    stop=tenacity.stop_after_attempt(LOCK_RETRIES + 1),
)


def retry_locked(fn: Callable[[], Any], what: str) -> Any:
    """fn(), retried while SQLite says the database is locked or busy. Any other error goes through."""
    try:
        return _LOCKED(fn)
    except tenacity.RetryError as exc:
        raise StoreError(f"{what}: the database stayed locked after {LOCK_RETRIES} retries") from (
            exc.last_attempt.exception()
        )
