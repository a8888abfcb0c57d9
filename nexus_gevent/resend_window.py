"""The shed resend window: a client's resend of a body answered with a durable 429 is a duplicate.

Under the `durable` policy a 429 means the entry is stored; a standard client retries on
429 anyway, without any idempotency key, and would store it again. So for
`NEXUS_SHED_RESEND_WINDOW` seconds after a durable 429 to a request without a key, a
request from the same source whose decoded body is byte-for-byte the same is answered
200 duplicate with the original payload_id(s), and stores nothing.

What is remembered: (source, SHA-256 of the decoded body) -> the payload_id(s) and an
expiry, in a small SQLite table shared by every worker of the data directory
(``{data_dir}/resend-window.db``): the resend may land on another worker. A row is
written only when a durable 429 is answered, which is rare.

The common write must not pay for this. So a hint tells whether any row may be live:
``{data_dir}/resend-window.hint`` holds the latest expiry written by any worker; each
worker maps it (mmap, MAP_SHARED), so reading it is a memory read and a clock read (a
vDSO call, no system call). Only while that time is ahead of now does a write without a
key hash its body and look in the table. The hint is raised (under flock) after the row
is committed and before the 429 is answered, so a client's resend, which follows that
answer, always finds the hint up. The hint may stay up longer than any row (pruned or
expired rows, a shorter window after a restart): that costs a lookup, never an answer.

The trade-off: within the window, two identical bodies from one source, the first of
which was shed, count once. Across instances (two data directories behind nginx) a
resend may reach another instance, which knows nothing of the first: there a client
needs an idempotency key.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import sqlite3
import struct
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from ._shared_map import locked, open_shared_map
from ._sqlite_thread import SQLiteThread, transaction

#: Mode of the hint file: the data directory is its user's alone, and so is this.
#: The hint's layout: a magic number (a zeroed or foreign file is not a hint), then the
#: latest expiry (time.time()) of any remembered body.
_HINT = struct.Struct("=Qd")
_MAGIC = 0x6E78_7273_6E64_7701  # "nxrsndw" and a version byte

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shed_bodies (
    source TEXT NOT NULL,
    digest BLOB NOT NULL,
    payload_ids TEXT NOT NULL,
    batch INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (source, digest)
) WITHOUT ROWID
"""

#: In the data directory (kept here, beside the one module that uses them).
DB_FILENAME = "resend-window.db"
HINT_FILENAME = "resend-window.hint"

#: The original write: a single entry's payload_id, or a batch's payload_ids in order.
Original = str | list[str]


def _setup(conn: sqlite3.Connection) -> None:
    transaction(conn, lambda t: t.execute(_SCHEMA))


class ResendWindow:
    """Bodies answered with a durable 429 in the last `window` seconds, shared by the workers of a data directory."""

    @classmethod
    def open(cls, data_dir: Path, *, window: float) -> ResendWindow:
        """The window of the data directory `data_dir` (its two files are created as needed)."""
        return cls(data_dir / DB_FILENAME, data_dir / HINT_FILENAME, window=window)

    def __init__(self, db_path: Path, hint_path: Path, *, window: float) -> None:
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {window!r}")
        self._window = window
        # A new hint file has no magic, so no body is remembered.
        self._fd, mapped = open_shared_map(hint_path, _HINT.size)
        self._hint: mmap.mmap | None = mapped
        self._db = SQLiteThread(db_path, _setup)
        # Opened now: a file that cannot be opened fails the worker's start, not a request.
        self._db.open()

    def active(self) -> bool:
        """Whether a remembered body may still be live: a memory read and a clock read, no system call."""
        hint = self._hint
        if hint is None:
            return False
        magic, until = _HINT.unpack_from(hint)
        return bool(magic == _MAGIC and time.time() < until)

    def lookup(self, source: str, body: bytes) -> Original | None:
        """The original write of this exact body from `source`, if it was shed within the window."""
        digest = hashlib.sha256(body).digest()
        now = time.time()
        row = self._db.run(
            lambda c: c.execute(
                "SELECT payload_ids, batch FROM shed_bodies WHERE source = ? AND digest = ? AND expires_at > ?",
                (source, digest, now),
            ).fetchone()
        )
        if row is None:
            return None
        ids = [str(pid) for pid in orjson.loads(str(row[0]))]
        return ids if row[1] else ids[0]

    def remember(self, source: str, body: bytes, original: Original) -> None:
        """Remember that this body from `source` was shed as `original`, for the window; then raise the hint."""
        digest = hashlib.sha256(body).digest()
        expires_at = time.time() + self._window
        batch = isinstance(original, list)
        ids: Sequence[str] = original if isinstance(original, list) else [original]
        self._db.run(
            lambda c: transaction(
                c,
                lambda t: t.execute(
                    "INSERT OR REPLACE INTO shed_bodies (source, digest, payload_ids, batch, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (source, digest, orjson.dumps(list(ids)).decode(), int(batch), expires_at),
                ),
            )
        )
        self._raise_hint(expires_at)

    def _raise_hint(self, until: float) -> None:
        hint = self._hint
        if hint is None:
            return
        # Under the lock: two workers raising it at once keep the later of their times.
        with locked(self._fd):
            magic, current = _HINT.unpack_from(hint)
            if magic != _MAGIC or not math.isfinite(current) or current < until:
                _HINT.pack_into(hint, 0, _MAGIC, until)

    def prune(self) -> int:
        """Forget expired bodies; returns how many went."""
        now = time.time()
        cur = self._db.run(lambda c: c.execute("DELETE FROM shed_bodies WHERE expires_at <= ?", (now,)))
        return int(cur.rowcount)

    def close(self) -> None:
        hint, self._hint = self._hint, None
        if hint is not None:
            hint.close()
            os.close(self._fd)
        self._db.close()
