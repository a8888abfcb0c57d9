"""A SQLite connection that lives in its own OS thread.

Nothing in sqlite3 yields to gevent: a busy wait on a lock held by another worker
would stall every greenlet of the process. So the connection is opened, used and
closed inside one dedicated thread, and greenlets hand it work with `run`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gevent.monkey
from gevent.threadpool import ThreadPool

T = TypeVar("T")

#: Mode of a SQLite file the service creates: it holds payloads or keys, so the owner's only.
PRIVATE_FILE_MODE = 0o600


#: A real sleep for the connection's own OS thread (time.sleep is gevent's once patched).
_thread_sleep: Callable[[float], None] = gevent.monkey.get_original("time", "sleep")
#: Between two tries of a journal mode change that found the database locked.
_WAL_RETRY_PAUSE = 0.01


def enable_wal(conn: sqlite3.Connection, timeout_s: float) -> str:
    """`PRAGMA journal_mode=WAL`, retried for up to `timeout_s`; returns the mode SQLite reports.

    Two workers opening a new shared file at once both try to switch it to WAL, and
    SQLite answers "database is locked" at once, without its busy handler, when
    waiting could deadlock. Seen in CI: a worker failed to boot on it. Retrying a
    moment later succeeds, or finds the file in WAL mode already.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            _thread_sleep(_WAL_RETRY_PAUSE)


def create_private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 unless it exists; SQLite then opens it as a new database.

    sqlite3 would create it with the umask's mode (0644 under the usual 022); its
    -wal and -shm files copy the database file's mode, so they are private too. An
    existing file keeps its mode: it is the operator's. Any other failure is left
    to sqlite3's own open, which reports it as the database error callers classify.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError:
        return
    try:
        # O_CREAT's mode is filtered through the umask; set it exactly.
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


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
            create_private_file(self._path)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            enable_wal(conn, self._busy_timeout_ms / 1000)
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
