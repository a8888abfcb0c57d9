"""Record framing: how bytes on disk become records, and how damage is found.

A frame is ``MAGIC | length:u32le | crc32:u32le | kind:u8 | body``, where the CRC
covers the length, the kind and the body, so a damaged length is caught too.

Why the magic starts with a NUL byte: every body we write is JSON text or hex (JSON
text cannot hold a raw NUL; orjson escapes control characters), so the magic can
never appear inside a body. After damage, the scanner resynchronises on the next
magic without any risk that a client's payload smuggles in a forged frame.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

MAGIC = b"\x00NXR"
_HEADER = struct.Struct("<4sII")
HEADER_SIZE = _HEADER.size + 1  # + the kind byte

#: Largest body accepted on read. It bounds what a damaged length can make us
#: believe, and sits far above the largest request body a source may send.
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """An intact record found at `offset` in its file."""

    offset: int
    kind: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Damage:
    """A run of bytes starting at `offset` that holds no intact record."""

    offset: int
    length: int
    reason: str


def encode(kind: int, body: bytes) -> bytes:
    """Frame one record."""
    length = len(body)
    crc = zlib.crc32(body, zlib.crc32(bytes((kind,)), zlib.crc32(length.to_bytes(4, "little"))))
    return _HEADER.pack(MAGIC, length, crc) + bytes((kind,)) + body


def _check(buf: bytes, pos: int) -> tuple[int, str]:
    """Length of the intact frame at `pos`, or (-1, why it is not one)."""
    end = len(buf)
    if pos + HEADER_SIZE > end:
        return -1, "torn header"
    magic, length, crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return -1, "bad magic"
    if length > MAX_BODY:
        return -1, "impossible length"
    stop = pos + HEADER_SIZE + length
    if stop > end:
        return -1, "torn record"
    kind_at = pos + _HEADER.size
    actual = zlib.crc32(
        memoryview(buf)[kind_at:stop], zlib.crc32(buf[pos + 4 : pos + 8])
    )
    if actual != crc:
        return -1, "checksum mismatch"
    return HEADER_SIZE + length, ""


def scan(buf: bytes) -> Iterator[Frame | Damage]:
    """Yield every intact frame of `buf` in order, and one Damage per damaged run.

    Never raises: damage is reported and skipped, so a torn tail or a corrupt
    record in the middle costs only the bytes it covers.
    """
    pos = 0
    end = len(buf)
    damage_start = -1
    damage_reason = ""
    while pos < end:
        size, reason = _check(buf, pos)
        if size > 0:
            if damage_start >= 0:
                yield Damage(damage_start, pos - damage_start, damage_reason)
                damage_start = -1
            kind_at = pos + _HEADER.size
            yield Frame(pos, buf[kind_at], buf[kind_at + 1 : pos + size])
            pos += size
            continue
        if damage_start < 0:
            damage_start, damage_reason = pos, reason
        nxt = buf.find(MAGIC, pos + 1)
        pos = nxt if nxt >= 0 else end
    if damage_start >= 0:
        yield Damage(damage_start, end - damage_start, damage_reason)
