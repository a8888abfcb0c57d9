"""What both SQL destinations share: the reads of `nexus_entries` behind GET /query.

Rows are read oldest first by `seq`, a column that follows commit order; the cursor
is the last `seq` of a page, made opaque so clients cannot build their own. Each
destination keeps only what differs: how its driver spells the reads (`Dialect`),
how it runs them (`EntryTable._reading`) and which of its errors mean an outage.
Timestamps leave both destinations in one text form.
"""

from __future__ import annotations

import base64
import binascii
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from ..errors import DestinationError, DestinationUnavailable

_T = TypeVar("_T")

#: One record of GET /query, with the contract's keys.
Record = dict[str, object]


#: UTC ISO-8601 with microseconds and 'Z', e.g. 2026-11-28T06:24:10.123456Z.
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_timestamp(epoch_seconds: float) -> str:
    """UTC ISO-8601 with microseconds and 'Z', e.g. 2026-11-28T06:24:10.123456Z."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime(_TIMESTAMP_FORMAT)


def format_datetime(value: datetime) -> str:
    """An aware datetime in format_timestamp's form."""
    return value.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


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


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one driver spells the shared reads."""

    #: The driver's placeholder for a parameter ("?", "%s").
    mark: str
    #: The payload column, read as JSON text.
    payload: str
    #: A stored timestamp, as the driver returns it, in format_timestamp's form.
    timestamp: Callable[[Any], str]


def page_query(
    dialect: Dialect, *, destination: str, after_seq: int, source: str | None, subject: str | None, limit: int
) -> tuple[str, list[object]]:
    """The SELECT of one page, in the dialect's spelling, and its parameters."""
    mark = dialect.mark
    sql = [
        "SELECT seq, payload_id, source, subject, idempotency_key, received_at, delivered_at,",
        f"{dialect.payload} FROM nexus_entries WHERE destination = {mark} AND seq > {mark}",
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


#: Runs one SELECT with its parameters and returns every row.
Fetch = Callable[[str, Sequence[object]], Sequence[Sequence[Any]]]


def raise_if_outage(exc: Exception, classify: Callable[[Exception], DestinationError]) -> None:
    """Raise DestinationUnavailable, chained to `exc`, when `classify` says a failed read is an outage.

    Otherwise return, for the caller to re-raise `exc` as it is: a read spends no
    entry's attempts, so an error that is not an outage is no EntryRejected either.
    """
    classified = classify(exc)
    if isinstance(classified, DestinationUnavailable) and classified is not exc:
        raise classified from exc


class EntryTable(ABC):
    """One destination's rows of `nexus_entries`, read for GET /query with the same SQL on both drivers.

    A subclass says how its driver spells the reads (the `Dialect`) and how it runs
    them (`_reading`).
    """

    def __init__(self, name: str, dialect: Dialect) -> None:
        self._name = name
        self._dialect = dialect

    @property
    def name(self) -> str:
        """The destination's configured name; rows carry it in `destination`."""
        return self._name

    def query(
        self,
        source: str | None = None,
        subject: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> tuple[list[Record], str | None]:
        """One page of this destination's rows, oldest first, and the cursor of the next page.

        `next` is None when no row follows the page. A malformed `after` raises ValueError.
        """
        after_seq = page_start(limit, after)
        sql, params = page_query(
            self._dialect, destination=self._name, after_seq=after_seq, source=source, subject=subject, limit=limit
        )
        return self._reading(lambda fetch: page(fetch(sql, params), limit, self._dialect.timestamp))

    def count(self) -> int:
        """The number of rows stored for this destination."""
        sql = f"SELECT count(*) FROM nexus_entries WHERE destination = {self._dialect.mark}"
        return self._reading(lambda fetch: int(fetch(sql, [self._name])[0][0]))

    @abstractmethod
    def _reading(self, read: Callable[[Fetch], _T]) -> _T:
        """read(fetch), with a fetch on this destination's database.

        The fetch raises DestinationUnavailable for an outage (raise_if_outage) and any
        other error as it is.
        """
