"""The unit of work: one accepted write, as the WAL stores it and destinations receive it."""

from __future__ import annotations

import os
from typing import NamedTuple

import orjson

from .errors import PayloadDecodeError

#: The longest subject, however it is given (X-Subject, an OTLP attribute): it is stored in
#: a column of every row, and a bound keeps rows small.
MAX_SUBJECT_LENGTH = 255


def new_payload_id() -> str:
    """A fresh payload id: 32 lowercase hex digits, as the API documents."""
    # 128 random bits, as uuid4 has, without building a UUID object per request.
    return os.urandom(16).hex()


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
