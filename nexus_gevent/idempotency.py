"""The idempotency index: (source, Idempotency-Key) -> the payload_id (or a batch's payload_ids) that owns it.

Shared by every worker of the data directory (one SQLite file) and kept on disk, so a
retry that lands on another worker, or comes after a restart, finds the entry its first
request wrote.

The write path claims a key only after the entry is durable in the WAL. If two
requests race, both entries are in the WAL but only the first claim wins; the
loser's entry is settled as DISCARDED and never delivered. A crash between the WAL
append and the claim is repaired at replay, which claims the keys of the entries it
finds (and discards the losers).

A key sent with a batch names the whole batch: its row keeps the batch's first id in
`payload_id` and every id, in order, in `payload_ids` (NULL for a single entry). A key
taken from each element's body (a source's `idempotency_key_field`) names that one
entry: the elements' keys are looked up, and claimed, together (`lookup_many`,
`claim_each`), one thread hand-off and one transaction for the whole batch.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from ._sqlite_thread import SQLiteThread, transaction

#: The schema's version, kept in PRAGMA user_version. 0: the first table; 1 added the
#: `payload_ids` column (a batch's ids). A file of version 0 is migrated when opened.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    payload_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    payload_ids TEXT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID
"""

#: Who owns a key: the payload_id of a single-entry write, or a batch's payload_ids in order.
Owner = str | list[str]


class KeyClaim(NamedTuple):
    """One write's claim on a key: a single entry (`batch` False, one id) or a whole batch."""

    source: str
    key: str
    payload_ids: Sequence[str]
    created_at: float
    batch: bool


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute(_SCHEMA)
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
    if "payload_ids" not in columns:
        # A file from before batches: its rows all name single entries (NULL).
        conn.execute("ALTER TABLE idempotency_keys ADD COLUMN payload_ids TEXT NULL")
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) < SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _setup(conn: sqlite3.Connection) -> None:
    # In one write transaction: workers opening an old file at once migrate it once.
    transaction(conn, _migrate)


def _owner(payload_id: object, payload_ids: object) -> Owner:
    if payload_ids is None:
        return str(payload_id)
    return [str(pid) for pid in orjson.loads(str(payload_ids))]


class IdempotencyIndex:
    """Keys live at least `window` seconds after their first use."""

    def __init__(self, path: Path, *, window: float) -> None:
        self._window = window
        self._db = SQLiteThread(path, _setup)
        # Opened now: a file that cannot be opened fails the worker's start, not a request.
        self._db.open()

    def lookup(self, source: str, key: str) -> Owner | None:
        """Who owns this key, if it is still within the window: a payload_id, or a batch's list."""
        floor = time.time() - self._window
        row = self._db.run(
            lambda c: c.execute(
                "SELECT payload_id, payload_ids FROM idempotency_keys WHERE source = ? AND key = ? AND created_at >= ?",
                (source, key, floor),
            ).fetchone()
        )
        return None if row is None else _owner(row[0], row[1])

    def lookup_many(self, source: str, keys: Iterable[str]) -> dict[str, Owner]:
        """The live owners of those of `keys` that have one, in one hand-off to the index's thread."""
        wanted = list(dict.fromkeys(keys))
        floor = time.time() - self._window

        def _all(c: sqlite3.Connection) -> dict[str, Owner]:
            found: dict[str, Owner] = {}
            for key in wanted:
                row = c.execute(
                    "SELECT payload_id, payload_ids FROM idempotency_keys"
                    " WHERE source = ? AND key = ? AND created_at >= ?",
                    (source, key, floor),
                ).fetchone()
                if row is not None:
                    found[key] = _owner(row[0], row[1])
            return found

        return self._db.run(_all)

    def claim_each(self, claims: Sequence[KeyClaim]) -> list[Owner]:
        """Claim every one of `claims` in one transaction; each one's owner, in order (its own ids when it won)."""
        items = list(claims)
        return self._db.run(lambda c: transaction(c, lambda t: [self._claim(t, claim)[0] for claim in items]))

    def claim(self, source: str, key: str, payload_id: str, created_at: float) -> Owner:
        """Make the single entry `payload_id` own the key unless a live owner exists; return the owner."""
        claim = KeyClaim(source, key, (payload_id,), created_at, batch=False)
        return self._db.run(lambda c: transaction(c, lambda t: self._claim(t, claim)[0]))

    def claim_batch(self, source: str, key: str, payload_ids: Sequence[str], created_at: float) -> Owner:
        """Make the batch `payload_ids` own the key unless a live owner exists; return the owner."""
        claim = KeyClaim(source, key, tuple(payload_ids), created_at, batch=True)
        return self._db.run(lambda c: transaction(c, lambda t: self._claim(t, claim)[0]))

    def claim_many(self, claims: Iterable[KeyClaim]) -> set[str]:
        """Claim keys found at replay; return the payload_ids that lost their key."""
        items = list(claims)
        if not items:
            return set()

        def _all(t: sqlite3.Connection) -> set[str]:
            lost: set[str] = set()
            for claim in items:
                if not self._claim(t, claim)[1]:
                    lost.update(claim.payload_ids)
            return lost

        return self._db.run(lambda c: transaction(c, _all))

    def _claim(self, conn: sqlite3.Connection, claim: KeyClaim) -> tuple[Owner, bool]:
        """(the owner, whether it is this claim's write)."""
        row = conn.execute(
            "SELECT payload_id, created_at, payload_ids FROM idempotency_keys WHERE source = ? AND key = ?",
            (claim.source, claim.key),
        ).fetchone()
        if row is not None:
            owner = _owner(row[0], row[2])
            held = owner if isinstance(owner, list) else [owner]
            # Sharing an id means the same write: a replay claiming again what was claimed
            # before the crash, perhaps with some of a batch's entries delivered since.
            if not set(held).isdisjoint(claim.payload_ids):
                return owner, True
            if row[1] >= time.time() - self._window:
                return owner, False
        ids = list(claim.payload_ids)
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys (source, key, payload_id, created_at, payload_ids)"
            " VALUES (?, ?, ?, ?, ?)",
            (claim.source, claim.key, ids[0], claim.created_at, orjson.dumps(ids).decode() if claim.batch else None),
        )
        return (ids if claim.batch else ids[0]), True

    def prune(self) -> int:
        """Forget keys older than the window; returns how many went."""
        floor = time.time() - self._window
        cur = self._db.run(lambda c: c.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (floor,)))
        return int(cur.rowcount)

    def close(self) -> None:
        self._db.close()
