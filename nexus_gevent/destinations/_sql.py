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
import functools
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from ..errors import DestinationError, DestinationUnavailable

_T = TypeVar("_T")

#: One record of GET /query, with the API's keys.
Record = dict[str, object]

#: A page of GET /query holds at most this many payload bytes (and at least one record),
#: whatever its `limit`: records of up to 1 MiB each would otherwise make a page of 1000
#: cost a gigabyte. The `next` cursor continues where the budget cut the page.
DEFAULT_PAGE_BYTES = 16 * 1024 * 1024


#: UTC ISO-8601 with microseconds and 'Z', e.g. 2026-11-28T06:24:10.123456Z.
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_timestamp(epoch_seconds: float) -> str:
    """UTC ISO-8601 with microseconds and 'Z', e.g. 2026-11-28T06:24:10.123456Z.

    The same text as datetime.fromtimestamp(epoch_seconds, UTC).strftime(...), which
    cost 2.4 us a call: every single-entry write formats its receive time in the SQLite
    thread, GIL held. The microseconds are rounded as datetime rounds them (half to
    even, carried into the seconds), and the part up to the seconds is formatted once
    a second.
    """
    fraction, whole = math.modf(epoch_seconds)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return f"{_seconds_text(int(whole))}.{micros:06d}Z"


@functools.lru_cache(maxsize=64)
def _seconds_text(epoch_seconds: int) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


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
    #: The payload's size in bytes, computed by the database.
    payload_bytes: str
    #: A stored timestamp, as the driver returns it, in format_timestamp's form.
    timestamp: Callable[[Any], str]


@dataclass(frozen=True, slots=True)
class PageFilter:
    """Which rows a page reads: one destination's, after a seq, optionally by sources and subject."""

    destination: str
    after_seq: int
    #: None: every source's records (the admin); otherwise only these sources'.
    sources: Sequence[str] | None
    subject: str | None

    def where(self, mark: str) -> tuple[str, list[object]]:
        """The WHERE clause, in the dialect's placeholder, and its parameters."""
        sql = [f"WHERE destination = {mark} AND seq > {mark}"]
        params: list[object] = [self.destination, self.after_seq]
        if self.sources is not None:
            sql.append(f"AND source IN ({', '.join([mark] * len(self.sources))})" if self.sources else "AND 0 = 1")
            params.extend(self.sources)
        if self.subject is not None:
            sql.append(f"AND subject = {mark}")
            params.append(self.subject)
        return " ".join(sql), params


def sizes_query(dialect: Dialect, where: PageFilter, limit: int) -> tuple[str, list[object]]:
    """The seq and payload size of up to limit + 1 rows: where a page ends, without reading a payload."""
    clause, params = where.where(dialect.mark)
    # One row more than asked tells whether a next page exists.
    sql = f"SELECT seq, {dialect.payload_bytes} FROM nexus_entries {clause} ORDER BY seq LIMIT {dialect.mark}"
    return sql, [*params, limit + 1]


def rows_query(dialect: Dialect, where: PageFilter, last_seq: int) -> tuple[str, list[object]]:
    """The rows of a page that ends at `last_seq`."""
    clause, params = where.where(dialect.mark)
    sql = (
        "SELECT seq, payload_id, source, subject, idempotency_key, received_at, delivered_at, "
        f"{dialect.payload} FROM nexus_entries {clause} AND seq <= {dialect.mark} ORDER BY seq"
    )
    return sql, [*params, last_seq]


def page_end(sizes: Sequence[Sequence[Any]], limit: int, max_bytes: int) -> tuple[int, bool]:
    """How many rows the page takes (at least one), and whether rows follow it."""
    taken = 0
    total = 0
    for _, size in sizes[:limit]:
        total += int(size)
        if taken and total > max_bytes:
            break
        taken += 1
    return taken, taken < len(sizes)


def page(rows: Sequence[Sequence[Any]], more: bool, timestamp: Callable[[Any], str]) -> tuple[list[Record], str | None]:
    """The records of a page read with rows_query, and the cursor of the next page (None at the end).

    Each payload is handed back as the JSON text the destination holds, never decoded
    and encoded again: a number keeps every digit, and any nesting a destination
    stored can be read back.
    """
    records: list[Record] = [
        {
            "payload_id": payload_id,
            "source": source,
            "subject": subject,
            "idempotency_key": key,
            "received_at": timestamp(received_at),
            "delivered_at": timestamp(delivered_at),
            "payload": orjson.Fragment(payload),
        }
        for _, payload_id, source, subject, key, received_at, delivered_at, payload in rows
    ]
    next_cursor = encode_cursor(rows[-1][0]) if more and rows else None
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
        *,
        sources: Sequence[str] | None = None,
        max_bytes: int = DEFAULT_PAGE_BYTES,
    ) -> tuple[list[Record], str | None]:
        """One page of this destination's rows, oldest first, and the cursor of the next page.

        `source` keeps one source's rows, `sources` those of any of them (both: both
        hold). A page ends after `limit` rows or once its payloads pass `max_bytes`,
        whichever comes first, and holds at least one row. `next` is None when no row
        follows the page. A malformed `after` raises ValueError.
        """
        after_seq = page_start(limit, after)
        if source is not None:
            sources = [source] if sources is None or source in sources else []
        where = PageFilter(self._name, after_seq, sources, subject)
        sizes_sql, sizes_params = sizes_query(self._dialect, where, limit)

        def read(fetch: Fetch) -> tuple[list[Record], str | None]:
            sizes = fetch(sizes_sql, sizes_params)
            taken, more = page_end(sizes, limit, max_bytes)
            if not taken:
                return [], None
            sql, params = rows_query(self._dialect, where, int(sizes[taken - 1][0]))
            return page(fetch(sql, params), more, self._dialect.timestamp)

        return self._reading(read)

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
