"""Dead letters: entries marked PERMANENT_FAILURE, kept where they can be listed and retried.

They live in one SQLite file shared by every worker of the data directory, so an
operator sees all of them from any worker, and the WAL segment that held the entry
can be reclaimed once the dead letter is stored here.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._sqlite_thread import SQLiteThread, transaction
from .entry import Entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    payload_id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    subject TEXT,
    idempotency_key TEXT,
    received_at REAL NOT NULL,
    payload BLOB NOT NULL,
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'dead'
)
"""

DEAD = "dead"
#: Put back to PENDING by an operator; it leaves the list once delivered.
RETRYING = "retrying"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead letter, with why it failed."""

    entry: Entry
    error: str
    attempts: int
    failed_at: float
    status: str


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute(_SCHEMA)


def _row_to_letter(row: Any) -> DeadLetter:
    (payload_id, source, destination, subject, key, received_at, payload, error, attempts, failed_at, status) = row
    entry = Entry(
        payload_id=str(payload_id),
        source=str(source),
        destination=str(destination),
        subject=None if subject is None else str(subject),
        idempotency_key=None if key is None else str(key),
        received_at=float(received_at),
        payload=bytes(payload),
    )
    return DeadLetter(entry, str(error), int(attempts), float(failed_at), str(status))


_COLUMNS = (
    "payload_id, source, destination, subject, idempotency_key, received_at, payload,"
    " error, attempts, failed_at, status"
)


class DeadLetterStore:
    """The shared dead-letter file of a data directory."""

    def __init__(self, path: Path) -> None:
        self._db = SQLiteThread(path, _setup)
        # Opened now: a file that cannot be opened fails the worker's start, not a request.
        self._db.open()

    def record(self, entry: Entry, error: str, attempts: int) -> None:
        """Store a dead letter durably; returns only after the commit is on disk."""
        row = (
            entry.payload_id,
            entry.source,
            entry.destination,
            entry.subject,
            entry.idempotency_key,
            entry.received_at,
            entry.payload,
            error,
            attempts,
            time.time(),
            DEAD,
        )
        self._db.run(
            lambda c: c.execute(f"INSERT OR REPLACE INTO dead_letters ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
        )

    def page(self, *, limit: int = 100, after: str | None = None) -> list[DeadLetter]:
        """Dead letters ordered by payload_id, `limit` of them after `after`."""
        sql = f"SELECT {_COLUMNS} FROM dead_letters WHERE payload_id > ? ORDER BY payload_id LIMIT ?"
        rows = self._db.run(lambda c: c.execute(sql, (after or "", limit)).fetchall())
        return [_row_to_letter(r) for r in rows]

    def get(self, payload_id: str) -> DeadLetter | None:
        sql = f"SELECT {_COLUMNS} FROM dead_letters WHERE payload_id = ?"
        row = self._db.run(lambda c: c.execute(sql, (payload_id,)).fetchone())
        return None if row is None else _row_to_letter(row)

    def count(self) -> int:
        return int(
            self._db.run(
                lambda c: c.execute("SELECT count(*) FROM dead_letters WHERE status = ?", (DEAD,)).fetchone()[0]
            )
        )

    def retrying_ids(self) -> set[str]:
        """Dead letters being retried: they leave the store once delivered."""
        rows = self._db.run(
            lambda c: c.execute("SELECT payload_id FROM dead_letters WHERE status = ?", (RETRYING,)).fetchall()
        )
        return {str(r[0]) for r in rows}

    def set_retrying(self, payload_id: str) -> bool:
        """Flag a dead letter as being retried; False if there is no such dead letter."""
        cur = self._db.run(
            lambda c: c.execute("UPDATE dead_letters SET status = ? WHERE payload_id = ?", (RETRYING, payload_id))
        )
        return cur.rowcount > 0

    def forget_delivered(self, payload_ids: list[str]) -> None:
        """Drop retried dead letters once they have been delivered."""
        if not payload_ids:
            return
        marks = ",".join("?" * len(payload_ids))
        self._db.run(
            lambda c: transaction(
                c,
                lambda t: t.execute(
                    f"DELETE FROM dead_letters WHERE status = ? AND payload_id IN ({marks})", (RETRYING, *payload_ids)
                ),
            )
        )

    def close(self) -> None:
        self._db.close()
