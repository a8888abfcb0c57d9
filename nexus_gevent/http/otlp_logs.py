"""POST /v1/logs: OpenTelemetry logs over OTLP/HTTP (https://opentelemetry.io/docs/specs/otlp/#otlphttp).

One request is one batch (http/inbound.py's path): each LogRecord is one entry, its own
payload_id and row (otlp.py maps it). The source is the token's, since exporters post to
this fixed path. What differs from /inbound is what OTLP exporters understand:

- 200 with an ExportLogsServiceResponse in the request's encoding, sent after the one
  fsync covering every stored record. Records no destination of this source can store
  (nesting, PostgreSQL's JSONB limits) are left out and counted in `partial_success`;
  the rest are stored (the specification's partial success, not /inbound's all or nothing).
- Overload is 429 with Retry-After, which exporters retry. Under the `durable` policy the
  records of a shed request ARE stored; the 429 says so, and the exporter's resend (the
  same bytes) falls in the shed resend window and is answered 200 storing nothing new:
  exactly once, as long as the resend comes within the window (docs/otlp.md).
- Errors keep the API's JSON shape in either encoding: the status code is what exporters
  act on, and they only log the body (docs/otlp.md, "Errors").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import falcon
import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceResponse,
)

from .. import metrics, otlp
from .._json_limits import MAX_NESTING, nesting_exceeds
from ..auth import Principal
from ..config import Settings
from ..destinations import PayloadCheck
from ..errors import MalformedOtlp
from ..ingest import Ingest, WriteResult
from . import _encoding
from .errors import ApiError, answer_error, rate_limited_body, rejected_body
from .inbound import check_burst, count_writes, idempotency_key, rate_limits, read_decoded_body

#: Media type -> encoding. OTLP names application/x-protobuf; application/protobuf is the registered name.
MEDIA_TYPES: dict[str, otlp.Encoding] = {
    "application/x-protobuf": "protobuf",
    "application/protobuf": "protobuf",
    "application/json": "json",
}
_RESPONSE_TYPES = {"protobuf": "application/x-protobuf", "json": falcon.MEDIA_JSON}
#: A durable 429's Retry-After is at most this share of the shed resend window: an exporter
#: that waits it and resends lands inside the window, the rest left for the request's travel
#: and the exporter's jitter. (Retry-After goes up to 60 s, the default window's length.)
RESEND_WINDOW_SHARE = 0.5
#: A full success, answered by the thousand: an empty ExportLogsServiceResponse in each encoding.
_SUCCESS = {"protobuf": b"", "json": b"{}"}


def encoding_of(content_type: str | None) -> otlp.Encoding:
    """The request's encoding from its Content-Type; 415 (RFC 9110 section 15.5.16) for any other, or none."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    encoding = MEDIA_TYPES.get(media)
    if encoding is None:
        raise ApiError(
            falcon.HTTP_415,
            "unsupported_media_type",
            "Content-Type must be application/x-protobuf or application/json (OTLP/HTTP)",
            details={"content_type": media[:100], "accepted_types": list(MEDIA_TYPES)},
        )
    return encoding


def response_body(encoding: otlp.Encoding, rejected: int, message: str) -> bytes:
    """An ExportLogsServiceResponse in `encoding`: empty, or reporting `rejected` records and why."""
    if not rejected:
        return _SUCCESS[encoding]
    response = ExportLogsServiceResponse(
        partial_success=ExportLogsPartialSuccess(rejected_log_records=rejected, error_message=message)
    )
    if encoding == "protobuf":
        return response.SerializeToString()
    return orjson.dumps(json_format.MessageToDict(response))


class OtlpLogsResource:
    """Writes the log records of one OTLP export request as one batch."""

    unauthorized_message = "a valid source token is required: Bearer, or Basic with the token as the password"

    def __init__(
        self, settings: Settings, ingest: Ingest, stopping: Callable[[], bool], checks: Mapping[str, PayloadCheck]
    ) -> None:
        self._settings = settings
        self._ingest = ingest
        self._stopping = stopping
        self._checks = checks
        self._counters = metrics.write_counters([s.name for s in settings.sources], settings.shed_policy)
        self._limits = rate_limits(settings)
        self._shed_message = _shed_message(settings.shed_resend_window)
        window = settings.shed_resend_window
        self._shed_retry_cap = max(1, int(window * RESEND_WINDOW_SHARE)) if window > 0 else None

    def authorize(self, principal: Principal, params: dict[str, Any]) -> None:
        """403 for the admin's token: only a source writes entries, and the token names which."""
        if principal.is_admin:
            raise ApiError(falcon.HTTP_403, "source_mismatch", "the admin token cannot write entries")

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal: Principal = req.context.principal
        source = principal.source
        assert source is not None
        req.context.source = source
        settings = self._settings.source(source)
        assert settings is not None
        encoding = encoding_of(req.content_type)
        coding = _encoding.content_coding(req.get_header("Content-Encoding"))
        key = idempotency_key(req)
        body = read_decoded_body(req, coding, self._settings.max_body_bytes, self._settings.body_timeout)
        try:
            request = otlp.decode_request(body, encoding)
        except MalformedOtlp as exc:
            raise ApiError(
                falcon.HTTP_400, "invalid_body", f"{exc}; nothing was stored", details={"encoding": encoding}
            ) from None
        entries = otlp.log_entries(request, settings.otlp_subject_attribute)
        limit = self._settings.max_batch_entries
        if len(entries) > limit:
            raise ApiError(
                falcon.HTTP_413,
                "batch_too_large",
                f"a request holds at most {limit} log records; this one holds {len(entries)}; nothing was stored",
                details={"entries": len(entries), "max_batch_entries": limit},
            )
        if self._stopping():
            raise ApiError(falcon.HTTP_503, "shutting_down", "this worker is shutting down; retry", retry_after=1)
        kept, rejected, reason = self._storable(entries, settings.destination)
        if not kept:
            # Nothing to store (an empty request, or every record refused): nothing to make durable.
            resp.content_type = _RESPONSE_TYPES[encoding]
            resp.data = response_body(encoding, rejected, reason)
            return
        check_burst(self._limits, source, len(kept), "this request holds {} log records")
        result = self._ingest.write_batch(
            source,
            settings.destination,
            [entry.payload for entry in kept],
            subject=None,
            key=key,
            body=body,
            subjects=[entry.subject for entry in kept],
        )
        count_writes(self._counters[source], result, len(kept))
        self._answer(req, resp, result, encoding, rejected=rejected, reason=reason)

    def _storable(self, entries: list[otlp.LogEntry], destination: str) -> tuple[list[otlp.LogEntry], int, str]:
        """The entries that can be stored; how many cannot, and why (the first reason, with its record's index)."""
        check = self._checks.get(destination)
        kept: list[otlp.LogEntry] = []
        reasons: list[str] = []
        for index, entry in enumerate(entries):
            refusal: str | None = None
            if nesting_exceeds(entry.payload, entry.value):
                refusal = f"arrays and objects nest deeper than {MAX_NESTING} levels"
            elif check is not None:
                refusal = check.unstorable(entry.payload, entry.value)
            if refusal is None:
                kept.append(entry)
            else:
                reasons.append(f"log record {index}: {refusal}")
        if not reasons:
            return kept, 0, ""
        more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return kept, len(reasons), f"{len(reasons)} log records cannot be stored: {reasons[0]}{more}"

    def _answer(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        result: WriteResult,
        encoding: otlp.Encoding,
        *,
        rejected: int,
        reason: str,
    ) -> None:
        if result.payload_ids:
            req.context.payload_id = result.payload_ids[0]
        if result.outcome in ("accepted", "duplicate"):
            # A duplicate is a resend of what is stored (its key, or the shed resend window): a success.
            resp.content_type = _RESPONSE_TYPES[encoding]
            resp.data = response_body(encoding, rejected, reason)
            return
        retry_after = result.retry_after or 1
        if result.outcome == "shed":
            if self._shed_retry_cap is not None:
                retry_after = min(retry_after, self._shed_retry_cap)
            ids = result.payload_ids or []
            answer_error(
                resp,
                ApiError(
                    falcon.HTTP_429,
                    "queue_full",
                    self._shed_message,
                    retry_after=retry_after,
                    extra={"payload_ids": ids},
                    details={"payload_ids": ids, "durable": True, "rejected_log_records": rejected},
                ),
            )
            return
        resp.status = falcon.HTTP_429
        resp.set_header("Retry-After", str(retry_after))
        resp.content_type = falcon.MEDIA_JSON
        if result.outcome == "rate_limited":
            rate, burst = self._limits[req.context.source]
            resp.data = rate_limited_body(retry_after, rate, burst)
        else:
            resp.data = rejected_body(retry_after)


def _shed_message(window: float) -> str:
    """The durable 429 of an OTLP request: stored, and its exporter's resend is answered 200 storing nothing."""
    if window <= 0:
        return (
            "the queue is full, but every log record is stored (durable in the WAL) and will be delivered; "
            "the shed resend window is off, so a resend would be stored again"
        )
    return (
        "the queue is full, but every log record is stored (durable in the WAL) and will be delivered; "
        f"a resend of the same request within {window:g} s is answered 200 and stores nothing new"
    )
