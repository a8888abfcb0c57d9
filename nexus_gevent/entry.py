"""The unit of work: one accepted write, as the WAL stores it and destinations receive it."""

from __future__ import annotations

import os
from typing import NamedTuple

import orjson

from .errors import PayloadDecodeError

#: Payload ids drawn from the OS at once: one getrandom() syscall per this many ids.
_IDS_PER_DRAW = 256
#: Ids drawn and not used yet. Emptied in a forked child, which must never reuse the parent's.
_unused_ids: list[str] = []
os.register_at_fork(after_in_child=_unused_ids.clear)


def new_payload_id() -> str:
    """A fresh payload id: 32 lowercase hex digits (128 random bits, as uuid4 has), as the API documents."""
    # One os.urandom() a request was a syscall that also gives up the GIL, which the WAL
    # and SQLite threads then hold for a while: drawn 256 at a time, an id costs a pop.
    # pop() and extend() are atomic, so threads may share the list.
    while True:
        try:
            return _unused_ids.pop()
        except IndexError:
            digits = os.urandom(16 * _IDS_PER_DRAW).hex()
            _unused_ids.extend(digits[i : i + 32] for i in range(0, len(digits), 32))


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
