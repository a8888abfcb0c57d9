"""The SQLite destination: the `nexus_entries` table in one local database file.

Every sqlite3 call runs in the connection's own OS thread (`SQLiteThread`): nothing
in sqlite3 yields to gevent, and a statement, an fsync or SQLite's busy wait would
otherwise stall every greenlet of the worker.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from .._sqlite_thread import DEFAULT_BUSY_TIMEOUT_MS, SQLiteThread, transaction
from ..entry import Entry
from ..errors import DestinationError, DestinationUnavailable, EntryRejected
from ._group_commit import GroupCommit
from ._sql import Dialect, EntryTable, Fetch, format_timestamp, raise_if_outage

_T = TypeVar("_T")

# `seq` orders rows for cursor paging. The contract fixes `payload_id` (text) as the
# primary key, so no INTEGER PRIMARY KEY can alias the rowid, and VACUUM may renumber
# the implicit rowid of such a table, which would silently break issued cursors.
# Ordering by (delivered_at, payload_id) is wrong too: two workers' clocks (or one
# clock stepping back) can commit a row "earlier" than one a reader already paged
# past. So `seq` is an explicit column, assigned as MAX(seq)+1 inside a
# BEGIN IMMEDIATE transaction: SQLite's single write lock makes it follow commit
# order across every process writing the file, and it never changes afterwards.
#
# "TEXT PRIMARY KEY" admits NULL in SQLite (a legacy quirk), hence the NOT NULL.
# The CHECK keeps the table's promise that `payload` is a JSON object, so reading it
# back for /query cannot fail; CASE because SQL's AND does not short-circuit and
# json_type() raises on malformed text.
_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS nexus_entries (
        payload_id      TEXT NOT NULL PRIMARY KEY,
        seq             INTEGER NOT NULL UNIQUE,
        source          TEXT NOT NULL,
        destination     TEXT NOT NULL,
        subject         TEXT NULL,
        idempotency_key TEXT NULL,
        received_at     TEXT NOT NULL,
        delivered_at    TEXT NOT NULL,
        payload         TEXT NOT NULL
            CONSTRAINT payload_is_json_object CHECK (
                CASE WHEN json_valid(payload) THEN json_type(payload) = 'object' ELSE 0 END
            )
    )
    """,
    # The filtered shapes of /query; the UNIQUE index on seq serves the unfiltered one.
    "CREATE INDEX IF NOT EXISTS nexus_entries_source_seq ON nexus_entries (source, seq)",
    "CREATE INDEX IF NOT EXISTS nexus_entries_subject_seq ON nexus_entries (subject, seq)",
)

#: MIGRATIONS[n] takes the file from `PRAGMA user_version` n to n + 1. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1,)
SCHEMA_VERSION = len(MIGRATIONS)

# ON CONFLICT (payload_id) DO NOTHING, not INSERT OR IGNORE: OR IGNORE also skips rows
# that break a NOT NULL or CHECK constraint, silently, and the caller would then mark
# an entry DELIVERED that was never stored. Only a known payload_id may be skipped.
#
# One statement inserts many rows, read from one JSON array parameter: sqlite3 releases
# the GIL around each sqlite3_step, and executemany steps once a row, so in a worker whose
# hub is busy with requests each row waited for the GIL again (12 of its 20 us a row,
# measured). One step per chunk waits once. `seq` is MAX(seq) read once under the write
# lock plus the row's index in the chunk: unique, in commit order, with a gap where a
# known payload_id is skipped. "WHERE true" is SQLite's documented way to let an
# INSERT ... SELECT take an ON CONFLICT clause.
_INSERT_ROWS = """
    INSERT INTO nexus_entries (
        seq, payload_id, source, destination, subject, idempotency_key,
        received_at, payload, delivered_at
    )
    SELECT
        ?1 + j.key, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'), ?2,
        json_extract(j.value, '$[2]'), json_extract(j.value, '$[3]'), json_extract(j.value, '$[4]'),
        json_extract(j.value, '$[5]'), ?3
    FROM json_each(?4) AS j
    WHERE true
    ON CONFLICT (payload_id) DO NOTHING
"""
_NEXT_SEQ = "SELECT COALESCE(MAX(seq), 0) + 1 FROM nexus_entries"
#: Payload bytes of one INSERT's JSON array, beyond its first row: bounds the copy the
#: array makes of a transaction of large entries, at one more GIL wait a chunk.
CHUNK_BYTES = 1 << 20

#: Pages of SQLite's WAL after which a commit copies them back into the database file
#: (SQLite's default: 1000, 4 MB). Every transaction rewrites the last pages of the
#: table and of its four indexes, so a longer interval copies each of those pages back
#: once instead of many times: sustained 100-entry batches 72-74k entries/s against
#: 59-66k with the default (bench/batch_path.py probes, same minutes). The cost: a WAL
#: file of up to about 40 MB beside the database, and a longer pause for the one
#: commit that checkpoints (the other worker keeps writing meanwhile).
WAL_AUTOCHECKPOINT_PAGES = 10_000

# Primary result codes meaning "the database cannot take writes right now", none of
# them the entry's fault. CORRUPT and NOTADB are included on purpose: a damaged file
# needs an operator, and turning every entry into a dead letter meanwhile would not help.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)
# Their messages, for exceptions that carry no result code (raised by hand, or by a
# Python older than 3.11).
_UNAVAILABLE_MESSAGES = (
    "database is locked",
    "database table is locked",
    "unable to open database file",
    "disk i/o error",
    "database or disk is full",
    "attempt to write a readonly database",
    "database disk image is malformed",
    "file is not a database",
    "out of memory",
    "locking protocol",
)


def classify_sqlite_error(exc: Exception) -> DestinationError:
    """Map an exception from a write to DestinationUnavailable or EntryRejected.

    The queue pauses and probes on the first, and spends the entry's attempts on the
    second, so anything not known to mean "unavailable" counts against the entry.
    """
    if isinstance(exc, DestinationError):
        return exc
    if isinstance(exc, sqlite3.Error):
        code: int | None = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            # Extended codes (SQLITE_IOERR_FSYNC, ...) keep the primary in the low byte.
            unavailable = (code & 0xFF) in _UNAVAILABLE_CODES
        else:
            message = str(exc).lower()
            unavailable = any(m in message for m in _UNAVAILABLE_MESSAGES)
        if unavailable:
            return DestinationUnavailable(f"sqlite: {exc}")
        return EntryRejected(f"sqlite {type(exc).__name__}: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        return EntryRejected(f"payload is not valid UTF-8: {exc}")
    if isinstance(exc, OSError):
        # The file or its folder cannot be reached (a mkdir or open failed): an
        # outage of the destination, not a fault of the entry.
        return DestinationUnavailable(f"sqlite: {exc}")
    return EntryRejected(f"{type(exc).__name__}: {exc}")


# Timestamps are stored as format_timestamp's text already.
_DIALECT = Dialect(mark="?", payload="payload", payload_bytes="length(CAST(payload AS BLOB))", timestamp=str)


class SQLiteDestination(EntryTable):
    """A Destination storing entries in `nexus_entries` of one SQLite file.

    Build it in the process that uses it (after gunicorn's fork): its thread belongs
    to the hub of the thread that creates it. The file is opened lazily, on the first
    call, so a database that is missing at startup reads as "unavailable" (probe,
    /ready) instead of failing the worker.
    """

    def __init__(self, name: str, path: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        super().__init__(name, _DIALECT)
        self._path = path
        self._closed = False
        self._thread = SQLiteThread(
            Path(path),
            _prepare,
            busy_timeout_ms=busy_timeout_ms,
            # Whatever stops the file from opening, the entries are not at fault.
            open_error=lambda exc: DestinationUnavailable(f"sqlite: cannot open {path!r}: {exc}"),
        )
        self._group_commit = GroupCommit(self._write_batch, DestinationUnavailable)

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    def write(self, entries: Sequence[Entry]) -> None:
        """Store all of `entries` in one durable transaction; a payload_id already stored is skipped."""
        if entries:
            self._group_commit.write(entries)

    def unstorable(self, payload: bytes, value: object) -> str | None:
        """SQLite keeps the JSON text as sent: any object within the ingest limits can be stored."""
        return None

    def probe(self) -> None:
        """Open the file if needed and take the write lock for a moment; DestinationUnavailable on any failure."""
        self._run(_probe)

    def close(self) -> None:
        """Close the connection in its thread, then stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._group_commit.fail_waiting(DestinationUnavailable(f"destination {self._name!r} is closed"))
        self._thread.close()

    # -- greenlet side -------------------------------------------------------------

    def _write_batch(self, entries: list[Entry]) -> None:
        # A write whose caller was killed while waiting still commits in the thread:
        # harmless, since the WAL keeps the entries PENDING and the redelivery skips
        # the known payload_ids.
        self._run(lambda conn: self._write_in_thread(conn, entries))

    def _reading(self, read: Callable[[Fetch], _T]) -> _T:
        # The whole page is built in the thread, JSON parsing included, so a large
        # page does not hold the hub.
        return self._run(lambda conn: read(partial(_fetch, conn)))

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise DestinationUnavailable(f"destination {self._name!r} is closed")
        return self._thread.run(fn)

    # -- the connection's thread ---------------------------------------------------

    def _write_in_thread(self, conn: sqlite3.Connection, entries: list[Entry]) -> None:
        try:
            # Decoded before taking the write lock, to hold it no longer than needed.
            # `destination` is this destination's name rather than the entry's own field
            # (they agree when the queue routes correctly): /query filters on it, so a
            # row stored here must always be visible through this destination.
            # The entries of one request share their receive time: each time is formatted once.
            received = {t: format_timestamp(t) for t in {e.received_at for e in entries}}
            chunks = _chunks(
                entries,
                lambda e: [
                    e.payload_id,
                    e.source,
                    e.subject,
                    e.idempotency_key,
                    received[e.received_at],
                    e.payload.decode("utf-8"),
                ],
            )

            def insert(locked: sqlite3.Connection) -> None:
                # MAX(seq) and delivered_at are read while no one else can commit.
                delivered_at = format_timestamp(time.time())
                seq = int(locked.execute(_NEXT_SEQ).fetchone()[0])
                for count, rows in chunks:
                    locked.execute(_INSERT_ROWS, (seq, self._name, delivered_at, rows))
                    seq += count

            # synchronous=FULL: COMMIT returns only once the WAL is fsynced, which is
            # what lets the caller mark the entries DELIVERED.
            transaction(conn, insert)
        except Exception as exc:
            raise classify_sqlite_error(exc) from exc


def _chunks(entries: Sequence[Entry], row: Callable[[Entry], list[object]]) -> list[tuple[int, str]]:
    """`entries` as JSON arrays of rows, each with CHUNK_BYTES of payload at most (or one row), and their counts."""
    chunks: list[tuple[int, str]] = []
    start = size = 0
    for i, entry in enumerate(entries):
        size += len(entry.payload)
        if size > CHUNK_BYTES and i > start:
            chunks.append((i - start, orjson.dumps([row(e) for e in entries[start:i]]).decode("utf-8")))
            start, size = i, len(entry.payload)
    chunks.append((len(entries) - start, orjson.dumps([row(e) for e in entries[start:]]).decode("utf-8")))
    return chunks


def _probe(conn: sqlite3.Connection) -> None:
    try:
        # A write lock, not a read: SELECT succeeds while another connection holds
        # the database locked, and delivery would flap between probe and write.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise DestinationUnavailable(f"sqlite: probe failed: {exc}") from exc


def _fetch(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.Error as exc:
        raise_if_outage(exc, classify_sqlite_error)
        raise


def _prepare(conn: sqlite3.Connection) -> None:
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    if mode.lower() != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    migrate(conn)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; a no-op on a file that is already there.

    `conn` must be in autocommit mode (isolation_level=None).
    """
    if _user_version(conn) == SCHEMA_VERSION:
        return  # the common case, without taking the write lock
    transaction(conn, _migrate_locked)


def _migrate_locked(conn: sqlite3.Connection) -> None:
    # Read again under the lock: another worker may have migrated meanwhile.
    current = _user_version(conn)
    if current > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {current} is newer than this code's {SCHEMA_VERSION}")
    for version in range(current, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version
