"""The idempotency index: (source, Idempotency-Key) -> the payload_id that owns it.

Shared by every worker of the data directory (one SQLite file) and kept on disk, so a
retry that lands on another worker, or comes after a restart, finds the entry its first
request wrote.

The write path claims a key only after the entry is durable in the WAL. If two
requests race, both entries are in the WAL but only the first claim wins; the
loser's entry is settled as DISCARDED and never delivered. A crash between the WAL
append and the claim is repaired at replay, which claims the keys of the entries it
finds (and discards the losers).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from ._sqlite_thread import SQLiteThread, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    payload_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID
"""


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute(_SCHEMA)


class IdempotencyIndex:
    """Keys live at least `window` seconds after their first use."""

    def __init__(self, path: Path, *, window: float) -> None:
        self._window = window
        self._db = SQLiteThread(path, _setup)
        # Opened now: a file that cannot be opened fails the worker's start, not a request.
        self._db.open()

    def lookup(self, source: str, key: str) -> str | None:
        """The payload_id that owns this key, if it is still within the window."""
        floor = time.time() - self._window
        row = self._db.run(
            lambda c: c.execute(
                "SELECT payload_id FROM idempotency_keys WHERE source = ? AND key = ? AND created_at >= ?",
                (source, key, floor),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    def claim(self, source: str, key: str, payload_id: str, created_at: float) -> str:
        """Make `payload_id` own the key unless a live owner exists; return the owner."""
        return self._db.run(lambda c: transaction(c, lambda t: self._claim(t, source, key, payload_id, created_at)))

    def claim_many(self, claims: Iterable[tuple[str, str, str, float]]) -> set[str]:
        """Claim keys found at replay; return the payload_ids that lost their key."""
        items = list(claims)
        if not items:
            return set()

        def _all(t: sqlite3.Connection) -> set[str]:
            return {pid for (src, key, pid, at) in items if self._claim(t, src, key, pid, at) != pid}

        return self._db.run(lambda c: transaction(c, _all))

    def _claim(self, conn: sqlite3.Connection, source: str, key: str, payload_id: str, created_at: float) -> str:
        row = conn.execute(
            "SELECT payload_id, created_at FROM idempotency_keys WHERE source = ? AND key = ?", (source, key)
        ).fetchone()
        if row is not None and (row[0] == payload_id or row[1] >= time.time() - self._window):
            return str(row[0])
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys (source, key, payload_id, created_at) VALUES (?, ?, ?, ?)",
            (source, key, payload_id, created_at),
        )
        return payload_id

    def prune(self) -> int:
        """Forget keys older than the window; returns how many went."""
        floor = time.time() - self._window
        cur = self._db.run(lambda c: c.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (floor,)))
        return int(cur.rowcount)

    def close(self) -> None:
        self._db.close()
