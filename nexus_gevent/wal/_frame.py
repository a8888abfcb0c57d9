"""Record framing: how bytes on disk become records, and how damage is found.

A frame is ``MAGIC | crc32:u32le | length:u32le | kind:u8 | body``. The CRC covers
everything after itself (length, kind and body), so a damaged length is caught too,
and one crc32 call over contiguous bytes checks a record.

Why the magic starts with a NUL byte: every body we write is JSON text or hex (JSON
text cannot hold a raw NUL; orjson escapes control characters), so the magic can
never appear inside a body. After damage, the scanner resynchronises on the next
magic without any risk that a client's payload smuggles in a forged frame.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

MAGIC = b"\x00NXR"
_HEADER = struct.Struct("<4sII")
HEADER_SIZE = _HEADER.size + 1  # + the kind byte
CHECKED_FROM = 8  # the CRC covers the frame from here (length, kind, body)
KIND_AT = _HEADER.size

#: Largest body accepted on read. It bounds what a damaged length can make us
#: believe, and sits far above the largest request body a source may send.
MAX_BODY = 64 * 1024 * 1024


class Frame(NamedTuple):
    """An intact record found at `offset` in its file.

    A named tuple rather than a frozen dataclass: scan builds one per record, and a
    tuple is built about twice as fast (a frozen dataclass sets each field through
    object.__setattr__), while staying immutable.
    """

    offset: int
    kind: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Damage:
    """A run of bytes starting at `offset` that holds no intact record."""

    offset: int
    length: int
    reason: str


#: Unpacks (magic, crc, length) from a buffer at an offset.
unpack_header = _HEADER.unpack_from


def encode(kind: int, body: bytes) -> bytes:
    """Frame one record."""
    checked = len(body).to_bytes(4, "little") + bytes((kind,)) + body
    return MAGIC + zlib.crc32(checked).to_bytes(4, "little") + checked


def encode_many(kind: int, bodies: Iterable[bytes]) -> bytes:
    """Frame several records of one kind into one buffer: encode() of each, concatenated."""
    crc32 = zlib.crc32
    tag = bytes((kind,))
    frames = []
    for body in bodies:
        checked = len(body).to_bytes(4, "little") + tag + body
        frames.append(MAGIC + crc32(checked).to_bytes(4, "little") + checked)
    return b"".join(frames)


def _why_not(buf: bytes, pos: int) -> str:
    """Why the bytes at `pos` are not an intact frame (the slow path, for damage only)."""
    end = len(buf)
    if pos + HEADER_SIZE > end:
        return "torn header"
    magic, _crc, length = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return "bad magic"
    if length > MAX_BODY:
        return "impossible length"
    if pos + HEADER_SIZE + length > end:
        return "torn record"
    return "checksum mismatch"


def scan(buf: bytes, start: int = 0) -> Iterator[Frame | Damage]:
    """Yield every intact frame of `buf` from `start` on, in order, and one Damage per damaged run.

    Never raises: damage is reported and skipped, so a torn tail or a corrupt
    record in the middle costs only the bytes it covers.
    """
    unpack = _HEADER.unpack_from
    crc32 = zlib.crc32
    view = memoryview(buf)
    pos = start
    end = len(buf)
    damage_start = -1
    damage_reason = ""
    while pos < end:
        # The fast path: one unpack, one crc32, no allocation but the body.
        if pos + HEADER_SIZE <= end:
            magic, crc, length = unpack(buf, pos)
            stop = pos + HEADER_SIZE + length
            if magic == MAGIC and length <= MAX_BODY and stop <= end and crc32(view[pos + CHECKED_FROM : stop]) == crc:
                if damage_start >= 0:
                    yield Damage(damage_start, pos - damage_start, damage_reason)
                    damage_start = -1
                yield Frame(pos, buf[pos + KIND_AT], buf[pos + HEADER_SIZE : stop])
                pos = stop
                continue
        if damage_start < 0:
            damage_start, damage_reason = pos, _why_not(buf, pos)
        nxt = buf.find(MAGIC, pos + 1)
        pos = nxt if nxt >= 0 else end
    if damage_start >= 0:
        yield Damage(damage_start, end - damage_start, damage_reason)
