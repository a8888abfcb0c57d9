"""What the tests of both SQL destinations share: numbered entries, the record's shape, paging through."""

from __future__ import annotations

import re

import orjson

from nexus_gevent.destinations import Queryable
from nexus_gevent.entry import Entry
from nexus_gevent.testing import make_entry

#: The destination the tests write to.
DEST = "main"
#: The contract's timestamp text: UTC, microseconds, 'Z'.
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
#: The keys of one record of GET /query, per the contract.
RECORD_KEYS = frozenset(
    {"payload_id", "source", "subject", "idempotency_key", "received_at", "delivered_at", "payload"}
)
#: When entry 0 was received (2023-11-14T22:13:20Z); entry i comes i seconds later.
RECEIVED_BASE = 1_700_000_000.0


def numbered_entry(
    i: int,
    *,
    source: str = "default",
    subject: str | None = None,
    payload: bytes | None = None,
    received_base: float = RECEIVED_BASE,
) -> Entry:
    """Entry number i for DEST: payload_id i in hex, payload {"n": i}, key "key-i", received at received_base + i."""
    entry = make_entry(
        f"{i:032x}",
        payload=payload if payload is not None else orjson.dumps({"n": i}),
        source=source,
        destination=DEST,
    )
    return entry._replace(received_at=received_base + i, subject=subject, idempotency_key=f"key-{i}")


def page_through(
    dest: Queryable, *, limit: int, source: str | None = None, subject: str | None = None
) -> tuple[list[str], int]:
    """The payload_ids of every page `query` returns, following `next` to the last page, and the page count."""
    ids: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        records, cursor = dest.query(source=source, subject=subject, limit=limit, after=cursor)
        pages += 1
        ids.extend(str(r["payload_id"]) for r in records)
        if cursor is None:
            return ids, pages
