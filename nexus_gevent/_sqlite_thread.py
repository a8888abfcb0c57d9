"""One SQLite connection confined to its own OS thread.

Nothing in sqlite3 yields to gevent: a statement, an fsync or SQLite's own busy wait
on a lock held by another worker would stall every greenlet of the process. So the
connection is opened, used and closed inside one dedicated thread (an `IoThread`),
and greenlets hand it work with `run`, which blocks only the calling greenlet. The
connection is only ever used by the thread that made it, so `check_same_thread`
stays on as a tripwire.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import gevent.monkey

from ._files import make_dirs_durable
from ._io_thread import IoThread

T = TypeVar("T")
_A = TypeVar("_A")

#: How long a statement waits for another connection's lock before "database is locked".
DEFAULT_BUSY_TIMEOUT_MS = 5000

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
    """One connection, one thread: `run(fn)` calls fn(connection) in that thread.

    The file is opened on the first `run` (or `open`), and again on the next one if
    opening failed; `prepare(connection)` finishes each open (schema, migrations). An
    error raised by the open, by `prepare` or by `fn` reaches the caller of `run` as it
    is, unless `open_error` turns an open failure into another.
    Build it in the process that uses it (after gunicorn's fork): its thread pool
    belongs to the hub of the thread that creates it.
    """

    def __init__(
        self,
        path: Path,
        prepare: Callable[[sqlite3.Connection], None],
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        open_error: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self._pool = IoThread()
        self._path = path
        self._prepare = prepare
        self._busy_timeout_ms = busy_timeout_ms
        self._open_error = open_error
        self._closed = False
        # Touched only inside the pool's thread.
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open the file now rather than on the first `run`, so a failure shows here."""
        self.run(lambda conn: None)

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(connection), run in the connection's thread; blocks only the calling greenlet.

        After `close`, sqlite3.ProgrammingError, as a closed sqlite3 connection raises.
        """
        if self._closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        # Exceptions come back as values and are raised here: one raised inside a pool
        # task is also printed, with its traceback, by the hub's error handler, and
        # "database is locked" is an expected outcome, not a crash to log.
        # If the calling greenlet is killed while waiting, the task still finishes in
        # the thread: its effect stays, only its answer is lost.
        value, error = self._pool.apply(_capture, (self._call, fn))
        if error is not None:
            raise error
        return cast(T, value)

    def close(self) -> None:
        """Close the connection in its thread, then stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._pool.apply(self._close_in_thread)
        finally:
            self._pool.kill()

    # -- the pool's thread ---------------------------------------------------------

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._connection())

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except Exception as exc:
                if self._open_error is None:
                    raise
                raise self._open_error(exc) from exc
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        make_dirs_durable(self._path.parent)
        create_private_file(self._path)
        # isolation_level=None: the module opens no transactions of its own; callers
        # issue BEGIN IMMEDIATE / COMMIT themselves.
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            enable_wal(conn, self._busy_timeout_ms / 1000)
            # FULL, not WAL's usual NORMAL: NORMAL may lose the last commits on power
            # loss, and a commit must be durable before the caller relies on it.
            conn.execute("PRAGMA synchronous = FULL")
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_in_thread(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


def _capture(fn: Callable[[_A], T], arg: _A) -> tuple[T | None, Exception | None]:
    try:
        return fn(arg), None
    except Exception as exc:
        return None, exc


def transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """fn(conn) inside BEGIN IMMEDIATE ... COMMIT; on any error, rolled back and that error raised.

    `conn` must be in autocommit mode (isolation_level=None). IMMEDIATE takes the
    write lock up front, so waiting for it goes through busy_timeout instead of
    failing at once on a stale read snapshot, and what fn reads stays true until the
    commit. COMMIT is inside the guard: one that fails (busy, a full disk) may leave
    the transaction open, and the connection must not stay inside it.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise
    return result


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # The error that ended the transaction is what the caller needs; a failing
    # ROLLBACK adds nothing, and SQLite rolls an interrupted transaction back on the
    # next open anyway. SQLite may also have rolled back already (after SQLITE_FULL,
    # for one), and a second ROLLBACK would fail.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
