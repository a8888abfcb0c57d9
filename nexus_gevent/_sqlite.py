"""A SQLite connection that lives in its own OS thread.

Nothing in sqlite3 yields to gevent: a busy wait on a lock held by another worker
would stall every greenlet of the process. So the connection is opened, used and
closed inside one dedicated thread, and greenlets hand it work with `run`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gevent.threadpool import ThreadPool

T = TypeVar("T")


class SQLiteThread:
    """One connection, one thread. `run(fn)` calls fn(connection) in that thread."""

    def __init__(self, path: Path, setup: Callable[[sqlite3.Connection], None], *, busy_timeout_ms: int = 5000) -> None:
        self._pool = ThreadPool(1)
        self._conn: sqlite3.Connection | None = None
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self.run(setup)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit must survive power loss, not just a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            self._conn = conn
        return self._conn

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn(connection) in the connection's thread; blocks only the calling greenlet."""
        result: T = self._pool.apply(lambda: fn(self._connection()))
        return result

    def close(self) -> None:
        """Close the connection in its thread, then stop the thread. Idempotent."""
        if self._pool is None:
            return

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._pool.apply(_close)
        self._pool.kill()


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run fn inside BEGIN IMMEDIATE ... COMMIT, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result
