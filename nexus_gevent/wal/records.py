"""What the WAL's record bodies mean: entries, and the marks that end their PENDING state."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ..entry import Entry

ENTRY = ord("E")
DELIVERED = ord("D")
FAILED = ord("F")
#: An entry that lost an idempotency race: marked without delivery.
DISCARDED = ord("X")

KIND_NAMES = {ENTRY: "entry", DELIVERED: "delivered", FAILED: "failed", DISCARDED: "discarded"}

_ID_LEN = 32
_new_tuple = tuple.__new__


def encode_entry(entry: Entry) -> bytes:
    """Metadata as one JSON line, then the payload's bytes exactly as the client sent them.

    Keeping the payload out of the JSON means replay never re-parses or re-encodes it.
    orjson never emits a raw newline, so the first newline ends the metadata.
    """
    meta = {
        "i": entry.payload_id,
        "s": entry.source,
        "d": entry.destination,
        "t": entry.received_at,
    }
    if entry.subject is not None:
        meta["j"] = entry.subject
    if entry.idempotency_key is not None:
        meta["k"] = entry.idempotency_key
    if entry.batch is not None:
        meta["b"] = entry.batch
    return orjson.dumps(meta) + b"\n" + entry.payload


def encode_entries(entries: Sequence[Entry]) -> list[bytes]:
    """encode_entry of each entry, byte for byte, with the metadata they share encoded once.

    A batch's entries differ only in payload id and payload: source, destination, time,
    subject and key are the request's. So the metadata after the id is encoded once per
    run of entries that share it, and each entry adds its id in front (orjson keeps the
    keys in insertion order, so the id comes first either way). An entry with a place in
    a keyed batch ("b") is encoded on its own.
    """
    dumps = orjson.dumps
    bodies: list[bytes] = []
    shared: tuple[str, str, float, str | None, str | None] | None = None
    rest = b""
    for entry in entries:
        if entry.batch is not None:
            bodies.append(encode_entry(entry))
            continue
        fields = (entry.source, entry.destination, entry.received_at, entry.subject, entry.idempotency_key)
        if fields != shared:
            shared = fields
            meta: dict[str, object] = {"s": entry.source, "d": entry.destination, "t": entry.received_at}
            if entry.subject is not None:
                meta["j"] = entry.subject
            if entry.idempotency_key is not None:
                meta["k"] = entry.idempotency_key
            # '{"s":...}' without its brace: what follows the id in encode_entry's line.
            rest = b"," + dumps(meta)[1:] + b"\n"
        bodies.append(b'{"i":' + dumps(entry.payload_id) + rest + entry.payload)
    return bodies


def decode_entry(body: bytes) -> Entry:
    """Inverse of encode_entry; raises ValueError on a body that is not an entry."""
    return decode_entry_at(body, memoryview(body), 0, len(body))


def decode_entry_at(buf: bytes, view: memoryview, start: int, stop: int) -> Entry:
    """decode_entry of buf[start:stop], read in place (`view` is buf's): replay decodes straight from a segment."""
    cut = buf.find(b"\n", start, stop)
    if cut < 0:
        raise ValueError("entry record without a metadata line")
    meta = orjson.loads(view[start:cut])
    # Every field, in field order, straight through tuple.__new__: replay builds one Entry
    # per record, and the named tuple's own __new__ adds a Python call to each.
    return _new_tuple(
        Entry,
        (
            meta["i"],
            meta["s"],
            meta["d"],
            buf[cut + 1 : stop],
            meta["t"],
            meta.get("j"),
            meta.get("k"),
            _batch(meta.get("b")),
        ),
    )


def _batch(value: object) -> tuple[int, int] | None:
    """An entry's place in its batch, [position, size] on disk; ValueError or TypeError when malformed."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise TypeError("an entry's batch is not [position, size]")
    position, size = value
    if not (isinstance(position, int) and isinstance(size, int)):
        raise TypeError("an entry's batch is not [position, size]")
    return (position, size)


def encode_ids(payload_ids: Sequence[str]) -> bytes:
    """Several payload ids, fixed width, no separators: a mark costs 32 bytes an id."""
    return "".join(payload_ids).encode("ascii")


def decode_ids(body: bytes) -> list[str]:
    """Inverse of encode_ids; raises ValueError on a body of the wrong length."""
    if len(body) % _ID_LEN:
        raise ValueError("mark record of a length that is not a whole number of ids")
    text = body.decode("ascii")
    return [text[i : i + _ID_LEN] for i in range(0, len(text), _ID_LEN)]
