"""Content-Encoding of a request body (RFC 9110 section 8.4): which codings we take, and decoding them within a limit.

gzip (and its alias x-gzip, RFC 9110 section 18.6) and deflate: the zlib format of
RFC 1950, or the raw deflate stream some clients send under that name. The decoded
size is checked while decoding, so a small body that would inflate to gigabytes is
refused after `limit` + 1 bytes of output, not after the gigabytes.
"""

from __future__ import annotations

import zlib

import falcon

from .errors import ApiError

#: The codings a body may carry, as an Accept-Encoding value (RFC 9110 section 12.5.3).
ACCEPT_ENCODING = "gzip, x-gzip, deflate"
#: Coding -> zlib's wbits for it: 16 + MAX_WBITS reads the gzip format only, MAX_WBITS the zlib one.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: wbits of a raw deflate stream (no zlib header, no checksum).
_RAW_DEFLATE = -zlib.MAX_WBITS
_GZIP_MAGIC = b"\x1f\x8b"


def content_coding(header: str | None) -> str | None:
    """The one coding a Content-Encoding header names, or None; 415 for any other, or for several.

    `identity` means no coding. RFC 9110 section 15.5.16: a 415 caused by a coding
    carries Accept-Encoding with the codings that would have been accepted.
    """
    if header is None:
        return None
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return codings[0]
    raise ApiError(
        falcon.HTTP_415,
        "unsupported_encoding",
        f"Content-Encoding must be one of {ACCEPT_ENCODING} (or none)",
        details={"content_encoding": header[:100], "accepted_encodings": list(_WBITS)},
        headers={"Accept-Encoding": ACCEPT_ENCODING},
    )


def decode(data: bytes, coding: str, limit: int) -> bytes:
    """`data` decoded from `coding`; 413 past `limit` decoded bytes, 400 invalid_encoding if it does not decode.

    Not decoding means: a stream that is not in the coding's format, fails its
    checksum, ends before its end (truncated), or has bytes after its end (for gzip,
    bytes that do not start another member: RFC 1952 allows several members).
    """
    wbits = _WBITS[coding]
    if coding == "deflate" and not _zlib_header(data):
        # Some clients send raw deflate as "deflate" (RFC 9110 section 8.4.1.2 notes it).
        wbits = _RAW_DEFLATE
    parts: list[bytes] = []
    size = 0
    pending = data
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            while not decoder.eof:
                # max_length is never 0 here (0 would mean "no limit").
                chunk = decoder.decompress(pending, limit + 1 - size)
                pending = decoder.unconsumed_tail
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(coding, limit)
                    parts.append(chunk)
                elif not pending:
                    raise _undecodable(coding, "the stream ends before its end (truncated)")
        except zlib.error as exc:
            raise _undecodable(coding, str(exc)) from None
        pending = decoder.unused_data
        if not pending:
            return b"".join(parts)
        if wbits != _WBITS["gzip"] or not pending.startswith(_GZIP_MAGIC):
            raise _undecodable(coding, f"{len(pending)} bytes follow the end of the stream")


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950 section 2.2): method 8, and a check that divides by 31."""
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _too_large(coding: str, limit: int) -> ApiError:
    return ApiError(
        falcon.HTTP_413,
        "payload_too_large",
        f"the decoded body exceeds {limit} bytes",
        details={"max_body_bytes": limit, "content_encoding": coding},
    )


def _undecodable(coding: str, reason: str) -> ApiError:
    return ApiError(
        falcon.HTTP_400,
        "invalid_encoding",
        f"the body is not valid {coding}: {reason}; nothing was stored",
        details={"content_encoding": coding, "reason": reason[:200]},
    )
