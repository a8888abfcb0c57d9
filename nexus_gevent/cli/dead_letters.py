"""`wal dead-letters`: the rows of dead-letters.db, read with sqlite3 without writing anything.

Opened read-only. When no `-wal` file sits beside the database, no connection is
open on it (the service's stores keep one open while they run, and the last to
close checkpoints and removes it), so it is opened `immutable`: a plain read-only
open would leave `-wal` and `-shm` files behind, owned by whoever ran the tool.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ._format import iso, write_json, write_row

_QUERY = """
SELECT payload_id, source, destination, subject, received_at, length(payload), error, attempts, failed_at, status
FROM dead_letters ORDER BY failed_at, payload_id LIMIT ?
"""


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    payload_id: str
    source: str
    destination: str
    subject: str | None
    received_at: float
    payload_size: int
    error: str
    attempts: int
    failed_at: float
    status: str


def read_dead_letters(path: Path, *, limit: int | None) -> list[DeadLetterRow]:
    """Dead letters, oldest failure first; raises sqlite3.Error on a file that is not one."""
    mode = "ro" if Path(f"{path}-wal").exists() else "ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True)
    try:
        rows = conn.execute(_QUERY, (-1 if limit is None else limit,)).fetchall()
    finally:
        conn.close()
    return [
        DeadLetterRow(
            payload_id=str(r[0]),
            source=str(r[1]),
            destination=str(r[2]),
            subject=None if r[3] is None else str(r[3]),
            received_at=float(r[4]),
            payload_size=int(r[5]),
            error=str(r[6]),
            attempts=int(r[7]),
            failed_at=float(r[8]),
            status=str(r[9]),
        )
        for r in rows
    ]


def render(out: TextIO, rows: list[DeadLetterRow], *, as_json: bool) -> None:
    for row in rows:
        if as_json:
            write_json(
                out,
                {
                    "payload_id": row.payload_id,
                    "source": row.source,
                    "destination": row.destination,
                    "subject": row.subject,
                    "received_at": iso(row.received_at),
                    "payload_size": row.payload_size,
                    "attempts": row.attempts,
                    "failed_at": iso(row.failed_at),
                    "status": row.status,
                    "error": row.error,
                },
            )
        else:
            fields = [row.payload_id, row.source, row.destination, str(row.attempts), iso(row.failed_at), row.status]
            write_row(out, [*fields, row.error])
