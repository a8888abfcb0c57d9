"""Cursor paging over `nexus_entries`, shared by the SQL destinations.

Rows are read oldest first by `seq`, a column that follows commit order; the cursor
is the last `seq` of a page, made opaque so clients cannot build their own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

Record = dict[str, object]


def format_timestamp(epoch_seconds: float) -> str:
    """UTC ISO-8601 with microseconds and 'Z', e.g. 2026-11-28T06:24:10.123456Z."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_CURSOR_PREFIX = "seq:"
_CURSOR_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_CURSOR_SEQ = re.compile(r"[0-9]{1,19}")
_MAX_SEQ = 2**63 - 1


def encode_cursor(seq: int) -> str:
    """The opaque `next` cursor pointing after the row with this `seq`."""
    raw = f"{_CURSOR_PREFIX}{seq}".encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> int:
    """The `seq` inside a cursor made by encode_cursor; ValueError for anything else."""
    # b64decode silently drops characters outside the alphabet, so check them first.
    if not _CURSOR_CHARS.fullmatch(cursor):
        raise ValueError("malformed cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError("malformed cursor") from exc
    digits = raw[len(_CURSOR_PREFIX) :]
    if not raw.startswith(_CURSOR_PREFIX) or not _CURSOR_SEQ.fullmatch(digits):
        raise ValueError("malformed cursor")
    seq = int(digits)
    # Past SQLite's INTEGER range the driver raises OverflowError, not a clean refusal.
    if seq > _MAX_SEQ:
        raise ValueError("malformed cursor")
    return seq


def page_start(limit: int, after: str | None) -> int:
    """The `seq` a page starts after (0 for the first page); ValueError for a bad limit or cursor."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return decode_cursor(after) if after is not None else 0


def page_query(
    mark: str, payload: str, *, destination: str, after_seq: int, source: str | None, subject: str | None, limit: int
) -> tuple[str, list[object]]:
    """The SELECT of one page, with `mark` as the driver's placeholder and `payload` as the payload column."""
    sql = [
        "SELECT seq, payload_id, source, subject, idempotency_key, received_at, delivered_at,",
        f"{payload} FROM nexus_entries WHERE destination = {mark} AND seq > {mark}",
    ]
    params: list[object] = [destination, after_seq]
    if source is not None:
        sql.append(f"AND source = {mark}")
        params.append(source)
    if subject is not None:
        sql.append(f"AND subject = {mark}")
        params.append(subject)
    # One row more than asked tells whether a next page exists.
    sql.append(f"ORDER BY seq LIMIT {mark}")
    params.append(limit + 1)
    return " ".join(sql), params


def page(rows: Sequence[Sequence[Any]], limit: int, timestamp: Callable[[Any], str]) -> tuple[list[Record], str | None]:
    """The records of a page read with page_query, and the cursor of the next page (None at the end)."""
    records: list[Record] = [
        {
            "payload_id": payload_id,
            "source": source,
            "subject": subject,
            "idempotency_key": key,
            "received_at": timestamp(received_at),
            "delivered_at": timestamp(delivered_at),
            "payload": orjson.loads(payload),
        }
        for _, payload_id, source, subject, key, received_at, delivered_at, payload in rows[:limit]
    ]
    next_cursor = encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return records, next_cursor
