"""POST /inbound/{source}: authenticate, validate, make durable, enqueue, answer.

The body is one JSON object (one entry), or a batch: a JSON array of objects, or NDJSON
(one object a line). A batch is all or nothing: every element is checked as one entry
would be before anything is written, and the first bad one is named by its index.

202 means durable (RFC 9110 section 15.3.3: accepted, processing not finished);
429 is RFC 6585's Too Many Requests, with a Retry-After computed from the backlog
(`queue_full`) or from the source's token bucket (`rate_limit_exceeded`). Under the
`durable` policy a `queue_full` 429 means stored: its message says so, and that a resend
is safe anyway (with its key always, or the same body within the shed resend window).

A source's `idempotency_key_field` names a top-level field of each entry whose string
value is that entry's key, when the request has no Idempotency-Key header (the header
wins, and names a whole batch). Such a key obeys the header's rules, or the request is
400 `invalid_idempotency_key` (with `details.index` in a batch); a field that is missing
or not a string gives no key.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Mapping
from typing import Any

import falcon
import gevent
import orjson

from .. import metrics
from .._json_limits import MAX_NESTING, nesting_exceeds
from .._sockets import shut_down
from ..auth import Principal
from ..config import Settings
from ..destinations import PayloadCheck
from ..entry import MAX_SUBJECT_LENGTH
from ..ingest import Ingest, WriteResult
from . import _encoding
from .errors import ApiError, answer_error, rate_limited_body, rejected_body

#: Idempotency-Key: up to 255 visible ASCII characters (docs/openapi.yaml).
MAX_KEY_LENGTH = 255


def _visible_ascii(value: str) -> bool:
    return all(0x21 <= ord(ch) <= 0x7E for ch in value)


def read_body_within(req: falcon.Request, limit: int, timeout: float) -> bytes:
    """read_body, answered 408 (RFC 9110 section 15.5.9) when the body takes longer than `timeout` seconds.

    The connection is then closed: what is left of the body is still on its way, and
    reading the next request would mean waiting for it. A timeout of 0 waits for ever.
    """
    # gevent.Timeout is a BaseException, so _read_some's catch-all cannot take it for
    # a framing error.
    timer = gevent.Timeout(timeout or None)
    try:
        with timer:
            return read_body(req, limit)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        # gunicorn ignores an app's "Connection: close" and would read on, waiting for
        # the rest of this body before the next request; ending the reading side
        # makes it close the connection once the 408 is written.
        sock = req.env.get("gunicorn.socket")
        if sock is not None:
            shut_down(sock, socket.SHUT_RD)
        raise ApiError(
            falcon.HTTP_408,
            "request_timeout",
            f"the request body did not arrive within {timeout:g} s; nothing was stored",
            details={"body_timeout_seconds": timeout},
            headers={"Connection": "close"},
        ) from None


def read_body(req: falcon.Request, limit: int) -> bytes:
    """The request body, refused with 413 (RFC 9110 section 15.5.14) past `limit` bytes.

    A declared Content-Length over the limit is refused before reading anything; a
    body without one is read only up to limit + 1 bytes.
    """
    declared = req.content_length
    if declared is not None and declared > limit:
        raise ApiError(
            falcon.HTTP_413, "payload_too_large", f"the body exceeds {limit} bytes", details={"max_body_bytes": limit}
        )
    if declared is not None:
        # The common case: one read of exactly the declared length. gunicorn's body
        # reader returns all of it, or less only when the client stopped sending.
        data = _read_some(req.stream, declared) if declared else b""
        if len(data) != declared:
            raise ApiError(
                falcon.HTTP_400,
                "invalid_body",
                "the body ended before its Content-Length",
                details={"content_length": declared, "received": len(data)},
            )
        return data
    # Falcon's bounded_stream reads nothing without a Content-Length. A chunked body
    # has none; the server then ends the input itself (wsgi.input_terminated, which
    # gunicorn sets), so the raw stream can be read to its end.
    stream = req.stream if req.env.get("wsgi.input_terminated") else req.bounded_stream
    chunks: list[bytes] = []
    left = limit + 1
    while left > 0:
        chunk = _read_some(stream, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b"".join(chunks)
    if len(data) > limit:
        raise ApiError(
            falcon.HTTP_413, "payload_too_large", f"the body exceeds {limit} bytes", details={"max_body_bytes": limit}
        )
    return data


def _read_some(stream: Any, size: int) -> bytes:
    """Up to `size` bytes of the body; 400 when the server cannot parse the body's framing.

    gunicorn raises from inside read() for a malformed chunked body (a chunk size
    that is not hex, a missing CRLF): that is the request's fault, not a 500.
    """
    try:
        data: bytes = stream.read(size)
    except Exception as exc:
        raise ApiError(
            falcon.HTTP_400,
            "invalid_body",
            "the request body could not be read",
            details={"reason": type(exc).__name__},
        ) from None
    return data


#: The media types of a JSON body, besides any application/*+json (the +json suffix, RFC 6839 section 3.1).
JSON_MEDIA_TYPES = ("application/json", "application/x-ndjson", "application/jsonl")
_ACCEPTED_TYPES = "application/json, application/*+json, application/x-ndjson or application/jsonl"
#: Media types of a batch with one JSON object a line (NDJSON, JSON Lines).
NDJSON_MEDIA_TYPES = frozenset({"application/x-ndjson", "application/jsonl"})


def check_content_type(req: falcon.Request) -> None:
    """415 (RFC 9110 section 15.5.16) for a present Content-Type that is not JSON.

    JSON is application/json (with any parameters), any application/*+json, and the
    two names of newline-delimited JSON.
    """
    content_type = req.content_type
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media in JSON_MEDIA_TYPES or _structured_json(media):
        return
    raise ApiError(
        falcon.HTTP_415,
        "unsupported_media_type",
        f"Content-Type must be {_ACCEPTED_TYPES}",
        details={"content_type": media[:100], "accepted_types": [*JSON_MEDIA_TYPES, "application/*+json"]},
    )


def _structured_json(media: str) -> bool:
    """Whether `media` is application/<something>+json, the +json structured syntax suffix."""
    kind, _, subtype = media.partition("/")
    return kind == "application" and subtype.endswith("+json") and len(subtype) > len("+json")


def read_decoded_body(req: falcon.Request, coding: str | None, limit: int, timeout: float) -> bytes:
    """read_body_within, then decoded from `coding` (None: as sent).

    `limit` bounds both the bytes on the wire and the decoded ones.
    """
    body = read_body_within(req, limit, timeout)
    return body if coding is None else _encoding.decode(body, coding, limit)


def is_ndjson(content_type: str | None) -> bool:
    """Whether a (checked) Content-Type announces NDJSON: a batch of one JSON object a line."""
    if content_type is None or content_type == falcon.MEDIA_JSON:
        # The common case costs one comparison.
        return False
    return content_type.split(";", 1)[0].strip().lower() in NDJSON_MEDIA_TYPES


def parse_body(body: bytes) -> dict[str, object] | list[object]:
    """The body parsed once: one JSON object (nested at most MAX_NESTING deep), or a batch's array; 400 otherwise."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            falcon.HTTP_400, "invalid_json", f"the body is not valid JSON: {exc.msg}", details={"position": exc.pos}
        ) from None
    if type(value) is list:
        return value
    if not isinstance(value, dict):
        raise ApiError(
            falcon.HTTP_400, "invalid_body", "the body must be a JSON object, or an array of objects (a batch)"
        )
    if nesting_exceeds(body, value):
        raise ApiError(
            falcon.HTTP_400,
            "invalid_body",
            f"arrays and objects nest deeper than {MAX_NESTING} levels",
            details={"max_nesting": MAX_NESTING},
        )
    return value


def parse_object(body: bytes) -> dict[str, object]:
    """The body as one JSON object, nested at most MAX_NESTING deep; 400 otherwise."""
    value = parse_body(body)
    if not isinstance(value, dict):
        raise ApiError(falcon.HTTP_400, "invalid_body", "the body must be a JSON object")
    return value


def _too_many(count: int, limit: int) -> ApiError:
    return ApiError(
        falcon.HTTP_413,
        "batch_too_large",
        f"a batch holds at most {limit} entries; this one holds {count}; nothing was stored",
        details={"entries": count, "max_batch_entries": limit},
    )


def _empty_batch() -> ApiError:
    return ApiError(falcon.HTTP_400, "invalid_body", "the batch holds no entries", details={"entries": 0})


def _bad_element(index: int, message: str, **details: object) -> ApiError:
    return ApiError(
        falcon.HTTP_400,
        "invalid_body",
        f"batch element {index}: {message}; nothing of the batch was stored",
        details={"index": index, **details},
    )


def array_batch(values: list[object], limit: int) -> list[tuple[bytes, dict[str, object]]]:
    """A JSON array's elements as entries: (the element's JSON text, its value); 400 or 413 otherwise.

    Each element is stored as its own JSON text, encoded again from the parsed value (the
    same JSON value; the client's whitespace inside the array is not kept).
    """
    if not values:
        raise _empty_batch()
    if len(values) > limit:
        raise _too_many(len(values), limit)
    entries: list[tuple[bytes, dict[str, object]]] = []
    for index, value in enumerate(values):
        if not isinstance(value, dict):
            raise _bad_element(index, "not a JSON object")
        entries.append((_checked(index, orjson.dumps(value), value), value))
    return entries


def ndjson_batch(body: bytes, limit: int) -> list[tuple[bytes, dict[str, object]]]:
    """NDJSON's lines as entries: (the line as sent, its value); blank lines skipped; 400 or 413 otherwise.

    `index` counts entries (blank lines are not entries), so it matches payload_ids.
    """
    lines = [line for line in (raw.strip() for raw in body.split(b"\n")) if line]
    if not lines:
        raise _empty_batch()
    if len(lines) > limit:
        raise _too_many(len(lines), limit)
    entries: list[tuple[bytes, dict[str, object]]] = []
    for index, line in enumerate(lines):
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                falcon.HTTP_400,
                "invalid_json",
                f"batch line {index} is not valid JSON: {exc.msg}; nothing of the batch was stored",
                details={"index": index, "position": exc.pos},
            ) from None
        if not isinstance(value, dict):
            raise _bad_element(index, "not a JSON object")
        entries.append((_checked(index, line, value), value))
    return entries


def _checked(index: int, raw: bytes, value: dict[str, object]) -> bytes:
    if nesting_exceeds(raw, value):
        raise _bad_element(index, f"arrays and objects nest deeper than {MAX_NESTING} levels", max_nesting=MAX_NESTING)
    return raw


def header(req: falcon.Request, name: str) -> str | None:
    """The header `name` as the server passed it (repeats joined by commas), or None.

    What req.get_header() returns, read straight from the WSGI environ under a key
    computed once per name: Falcon computes it on every call, and a write reads six headers.
    """
    value: str | None = req.env.get(_environ_key(name))
    return value


@functools.lru_cache(maxsize=64)
def _environ_key(name: str) -> str:
    """The WSGI environ key of a request header (PEP 3333): HTTP_ and the name in capitals, dashes as underscores."""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"


def optional_header(req: falcon.Request, name: str, code: str, limit: int) -> str | None:
    value = header(req, name)
    if value is None:
        return None
    if not value or len(value) > limit or not _visible_ascii(value):
        raise ApiError(falcon.HTTP_400, code, f"{name} must be 1 to {limit} visible ASCII characters")
    return value


def idempotency_key(req: falcon.Request) -> str | None:
    """The Idempotency-Key, else the X-Idempotency-Key some clients send, if any; 400 for two keys.

    The server joins repeated headers with a comma (RFC 9110 section 5.3), so a comma
    means the client sent two keys; nginx would hash only the first, and using the
    joined text as one key would match neither. A key is therefore comma-free. Both
    headers with different keys are two keys too.
    """
    key = _one_key(req, "Idempotency-Key")
    alternative = _one_key(req, "X-Idempotency-Key")
    if key is not None and alternative is not None and key != alternative:
        raise ApiError(
            falcon.HTTP_400,
            "invalid_idempotency_key",
            "Idempotency-Key and X-Idempotency-Key name different keys; send one of them",
        )
    return key if key is not None else alternative


def body_key(value: dict[str, object], field: str, index: int | None = None) -> str | None:
    """The entry's own idempotency key: its string `field`, checked like the header; None when it has none.

    `index` is the element's place in a batch (None for a single entry), for the 400's details.
    """
    key = value.get(field)
    if not isinstance(key, str):
        return None
    if key and len(key) <= MAX_KEY_LENGTH and _visible_ascii(key) and "," not in key:
        return key
    where = "" if index is None else f"batch element {index}: "
    details: dict[str, object] = {"field": field}
    if index is not None:
        details["index"] = index
    raise ApiError(
        falcon.HTTP_400,
        "invalid_idempotency_key",
        f"{where}the idempotency key in field {field!r} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters "
        "without commas; nothing was stored",
        details=details,
    )


def _one_key(req: falcon.Request, name: str) -> str | None:
    key = optional_header(req, name, "invalid_idempotency_key", MAX_KEY_LENGTH)
    if key is not None and "," in key:
        raise ApiError(
            falcon.HTTP_400,
            "invalid_idempotency_key",
            f"send one {name} header, without commas (two headers arrive joined by a comma)",
        )
    return key


def rate_limits(settings: Settings) -> dict[str, tuple[float, int]]:
    """Each rate-limited source's (entries a second, burst)."""
    return {
        s.name: (s.rate_limit_per_second, s.rate_limit_burst or 1)
        for s in settings.sources
        if s.rate_limit_per_second is not None
    }


def check_burst(limits: Mapping[str, tuple[float, int]], source: str, entries: int, holding: str) -> None:
    """413 for a batch of more entries than the source's burst; `holding` says what it holds ("this batch holds {}").

    A batch takes one token an entry: one larger than the burst could never pass, and a
    429 would only invite a retry that can never succeed.
    """
    limit = limits.get(source)
    if limit is None or entries <= limit[1]:
        return
    rate, burst = limit
    raise ApiError(
        falcon.HTTP_413,
        "batch_too_large",
        f"this source's rate limit lets at most {burst} entries through at once (its burst); "
        f"{holding.format(entries)}; nothing was stored",
        details={"entries": entries, "rate_limit_burst": burst, "rate_limit_per_second": rate},
    )


class InboundResource:
    """Writes one entry per request."""

    unauthorized_message = "a valid token is required: Bearer, or Basic with the token as the password"

    def __init__(
        self, settings: Settings, ingest: Ingest, stopping: Callable[[], bool], checks: Mapping[str, PayloadCheck]
    ) -> None:
        self._settings = settings
        self._ingest = ingest
        self._stopping = stopping
        #: Each destination's own word on what it can never store.
        self._checks = checks
        self._counters = metrics.write_counters([s.name for s in settings.sources], settings.shed_policy)
        self._limits = rate_limits(settings)
        #: Each source's idempotency_key_field, for the sources that have one.
        self._key_fields = {
            s.name: s.idempotency_key_field for s in settings.sources if s.idempotency_key_field is not None
        }
        self._shed_message = _shed_message(settings.shed_resend_window, batch=False)
        self._shed_batch_message = _shed_message(settings.shed_resend_window, batch=True)

    def authorize(self, principal: Principal, params: dict[str, Any]) -> None:
        """403 for the admin's or another source's token; 404 (to a caller with a token) for no such source."""
        if principal.is_admin:
            raise ApiError(falcon.HTTP_403, "source_mismatch", "the admin token cannot write entries")
        source = params["source"]
        # Only an authenticated caller learns whether a source exists.
        if self._settings.source(source) is None:
            raise ApiError(falcon.HTTP_404, "unknown_source", f"no source named {source!r}")
        if principal.source != source:
            raise ApiError(falcon.HTTP_403, "source_mismatch", "this token belongs to another source")

    def on_post(self, req: falcon.Request, resp: falcon.Response, source: str) -> None:
        req.context.source = source
        check_content_type(req)
        coding = _encoding.content_coding(header(req, "Content-Encoding"))
        key = idempotency_key(req)
        subject = optional_header(req, "X-Subject", "invalid_subject", MAX_SUBJECT_LENGTH)
        body = read_decoded_body(req, coding, self._settings.max_body_bytes, self._settings.body_timeout)
        if is_ndjson(req.content_type):
            entries = ndjson_batch(body, self._settings.max_batch_entries)
            self._post_batch(req, resp, source, entries, body, subject=subject, key=key)
            return
        value = parse_body(body)
        if type(value) is list:
            entries = array_batch(value, self._settings.max_batch_entries)
            self._post_batch(req, resp, source, entries, body, subject=subject, key=key)
            return
        field = self._key_fields.get(source)
        if key is None and field is not None and isinstance(value, dict):
            key = body_key(value, field)
        if self._stopping():
            raise ApiError(falcon.HTTP_503, "shutting_down", "this worker is shutting down; retry", retry_after=1)
        destination = self._settings.source(source).destination  # type: ignore[union-attr]
        check = self._checks.get(destination)
        refusal = check.unstorable(body, value) if check is not None else None
        if refusal is not None:
            raise ApiError(
                falcon.HTTP_400,
                "invalid_body",
                f"the destination cannot store this entry: {refusal}",
                details={"destination": destination},
            )
        result = self._ingest.write(source, destination, body, subject=subject, key=key)
        self._count(source, result)
        if result.outcome == "rate_limited":
            self._answer_rate_limited(resp, source, result.retry_after or 1)
            return
        self._answer(req, resp, result)

    def _post_batch(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        source: str,
        entries: list[tuple[bytes, dict[str, object]]],
        body: bytes,
        *,
        subject: str | None,
        key: str | None,
    ) -> None:
        """Write a checked batch, all or nothing, and answer it with its payload_ids.

        Without an Idempotency-Key header, the elements' own keys (the source's
        idempotency_key_field) count one by one.
        """
        if self._stopping():
            raise ApiError(falcon.HTTP_503, "shutting_down", "this worker is shutting down; retry", retry_after=1)
        check_burst(self._limits, source, len(entries), "this batch holds {}")
        destination = self._settings.source(source).destination  # type: ignore[union-attr]
        check = self._checks.get(destination)
        if check is not None:
            for index, (raw, value) in enumerate(entries):
                refusal = check.unstorable(raw, value)
                if refusal is not None:
                    raise _bad_element(
                        index, f"the destination cannot store this entry: {refusal}", destination=destination
                    )
        field = self._key_fields.get(source)
        element_keys = (
            [body_key(value, field, index) for index, (_raw, value) in enumerate(entries)]
            if key is None and field is not None
            else None
        )
        payloads = [raw for raw, _value in entries]
        result = self._ingest.write_batch(
            source, destination, payloads, subject=subject, key=key, element_keys=element_keys, body=body
        )
        self._count(source, result, len(payloads))
        if result.outcome == "rate_limited":
            self._answer_rate_limited(resp, source, result.retry_after or 1)
            return
        self._answer(req, resp, result)

    def _count(self, source: str, result: WriteResult, entries: int = 1) -> None:
        count_writes(self._counters[source], result, entries)

    def _answer_rate_limited(self, resp: falcon.Response, source: str, retry_after: int) -> None:
        # Like the reject policy's 429, this one comes by the thousand from a noisy
        # source: answered here, without raising through Falcon, from a cached body.
        rate, burst = self._limits[source]
        resp.status = falcon.HTTP_429
        resp.set_header("Retry-After", str(retry_after))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = rate_limited_body(retry_after, rate, burst)

    def _answer(self, req: falcon.Request, resp: falcon.Response, result: WriteResult) -> None:
        if result.payload_ids is not None:
            _answer_batch(req, resp, result, result.payload_ids, self._shed_batch_message)
            return
        req.context.payload_id = result.payload_id
        if result.outcome == "accepted":
            resp.status = falcon.HTTP_202
            resp.data = orjson.dumps({"payload_id": result.payload_id, "status": "accepted"})
        elif result.outcome == "duplicate":
            resp.status = falcon.HTTP_200
            resp.data = orjson.dumps({"payload_id": result.payload_id, "status": "duplicate"})
        elif result.outcome == "shed":
            answer_error(
                resp,
                ApiError(
                    falcon.HTTP_429,
                    "queue_full",
                    self._shed_message,
                    retry_after=result.retry_after,
                    extra={"payload_id": result.payload_id},
                    details={"payload_id": result.payload_id, "durable": True},
                ),
            )
            return
        else:
            # The one answer that comes by the thousand when the queue is full: its
            # body depends only on the delay, so it is built once per delay.
            retry_after = result.retry_after or 1
            resp.status = falcon.HTTP_429
            resp.set_header("Retry-After", str(retry_after))
            resp.content_type = falcon.MEDIA_JSON
            resp.data = rejected_body(retry_after)
            return
        resp.content_type = falcon.MEDIA_JSON


def count_writes(counters: metrics.WriteCounters, result: WriteResult, entries: int = 1) -> None:
    """Count a write's entries under its outcome: a batch of n counts n, its duplicate elements as duplicates."""
    accepted, duplicates, shed, rate_limited = counters
    if result.duplicates and result.outcome != "duplicate":
        duplicates.inc(len(result.duplicates))
        entries -= len(result.duplicates)
    if result.outcome == "accepted":
        accepted.inc(entries)
    elif result.outcome == "duplicate":
        duplicates.inc(entries)
    elif result.outcome == "rate_limited":
        rate_limited.inc(entries)
    else:
        shed.inc(entries)


def _shed_message(window: float, *, batch: bool) -> str:
    """The durable 429's message: stored, do not resend; and when a resend anyway is safe."""
    what = "every entry of the batch is stored" if batch else "the entry is stored"
    safe = "with the same idempotency key"
    if window > 0:
        safe += f", or with the same body within {window:g} s"
    return (
        f"the queue is full, but {what} (durable in the WAL) and will be delivered: do not resend it. "
        f"A resend anyway is safe: {safe}, it is answered 200 duplicate"
    )


def _answer_batch(
    req: falcon.Request, resp: falcon.Response, result: WriteResult, payload_ids: list[str], shed_message: str
) -> None:
    """The answer to a batch (or to a duplicate of one): its payload_ids, in element order.

    When elements carried their own keys, `duplicates` lists the indexes of those that
    were duplicates (their payload_ids are the originals'); a batch of duplicates only is 200.
    """
    # The request's log line names the batch by its first entry.
    req.context.payload_id = payload_ids[0]
    answer: dict[str, object] = {"status": result.outcome, "payload_ids": payload_ids}
    if result.duplicates is not None:
        answer["duplicates"] = result.duplicates
    if result.outcome == "accepted":
        resp.status = falcon.HTTP_202
        resp.data = orjson.dumps(answer)
    elif result.outcome == "duplicate":
        resp.status = falcon.HTTP_200
        resp.data = orjson.dumps(answer)
    else:
        extra: dict[str, object] = {"payload_ids": payload_ids}
        details: dict[str, object] = {"payload_ids": payload_ids, "durable": True}
        if result.duplicates is not None:
            extra["duplicates"] = details["duplicates"] = result.duplicates
        answer_error(
            resp,
            ApiError(
                falcon.HTTP_429,
                "queue_full",
                shed_message,
                retry_after=result.retry_after,
                extra=extra,
                details=details,
            ),
        )
        return
    resp.content_type = falcon.MEDIA_JSON
