"""The unit of work: one accepted write, as the WAL stores it and destinations receive it."""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import orjson

from .errors import PayloadDecodeError

#: The longest subject, however it is given (X-Subject, an OTLP attribute): it is stored in
#: a column of every row, and a bound keeps rows small.
MAX_SUBJECT_LENGTH = 255

#: Random parts of payload ids drawn from the OS at once: one getrandom() syscall per this many ids.
_IDS_PER_DRAW = 256
#: A payload id's random part: 80 bits, as 20 hex digits (after 12 of time).
_RANDOM_BYTES = 10
_RANDOM_DIGITS = 2 * _RANDOM_BYTES
#: Random parts drawn and not used yet. Emptied in a forked child, which must never reuse the parent's.
_unused: list[str] = []
os.register_at_fork(after_in_child=_unused.clear)


def new_payload_id() -> str:
    """A fresh payload id: 32 lowercase hex digits, as the API documents: the time, then 80 random bits.

    The first 12 digits are the milliseconds since the epoch, so ids made close in time
    sort close together, as in a UUIDv7 (RFC 9562's 48-bit Unix-millisecond layout).
    Destinations keep a b-tree index on payload_id: with wholly random ids every insert
    dirtied a random leaf page, and SQLite wrote about 7.8 KB and 3.3 write calls a row
    (40-row transactions, 60k rows); with ids in time order, 2 KB and 0.9, at half the
    CPU. 80 random bits keep ids made in the same millisecond, by any number of workers,
    apart. Nothing relies on the time prefix being exact or monotonic.
    """
    return f"{time.time_ns() // 1_000_000:012x}{_random_part()}"


def new_payload_ids(n: int) -> list[str]:
    """`n` fresh payload ids (new_payload_id's form) with one clock read: the entries of a batch."""
    head = f"{time.time_ns() // 1_000_000:012x}"
    return [head + _random_part() for _ in range(n)]


def _random_part() -> str:
    # One os.urandom() a request was a syscall that also gives up the GIL, which the WAL
    # and SQLite threads then hold for a while: drawn 256 at a time, a random part costs
    # a pop. pop() and extend() are atomic, so threads may share the list.
    while True:
        try:
            return _unused.pop()
        except IndexError:
            digits = os.urandom(_RANDOM_BYTES * _IDS_PER_DRAW).hex()
            _unused.extend(digits[i : i + _RANDOM_DIGITS] for i in range(0, len(digits), _RANDOM_DIGITS))


class Entry(NamedTuple):
    """One accepted write. `payload` is the client's JSON object, as UTF-8 JSON text.

    A named tuple rather than a frozen dataclass: replay builds one per WAL record,
    and a tuple is built several times faster, while staying immutable.
    """

    payload_id: str
    source: str
    destination: str
    payload: bytes
    received_at: float
    subject: str | None = None
    idempotency_key: str | None = None
    #: For an entry of a batch written under an Idempotency-Key (the key names the whole
    #: batch): (its 0-based position, the batch's size), so that replay can claim the key
    #: for the whole batch again. None otherwise.
    batch: tuple[int, int] | None = None

    def decode_payload(self) -> dict[str, object]:
        """The payload as a dict; raises PayloadDecodeError if it is not a JSON object."""
        try:
            value = orjson.loads(self.payload)
        except orjson.JSONDecodeError as exc:
            raise PayloadDecodeError(f"payload is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise PayloadDecodeError("payload is not a JSON object")
        return value
