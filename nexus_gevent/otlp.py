"""OpenTelemetry logs (OTLP) to entries: decoding an ExportLogsServiceRequest, and one JSON payload per LogRecord.

The messages are opentelemetry-proto's, decoded by protobuf: binary (`application/x-protobuf`)
or OTLP/JSON, which is protobuf's JSON mapping with the specification's exceptions
(https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding): trace and span ids are
hex strings, not base64; enum values may be integers; keys are lowerCamelCase (the
original field names are taken too); unknown fields are ignored.

A record's payload keeps what a reader needs, in plain JSON (docs/otlp.md shows a row):
the body (any AnyValue), severity, timestamps (integers, nanoseconds since the epoch,
0 for unknown as in OTLP), trace and span ids (lowercase hex, null when absent or invalid), flags,
its attributes, its resource's attributes and its scope.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from .entry import MAX_SUBJECT_LENGTH
from .errors import MalformedOtlp

Encoding = Literal["protobuf", "json"]

#: The id fields OTLP/JSON carries as hex, under both names protobuf's parser takes.
_HEX_ID_FIELDS = ("traceId", "spanId", "trace_id", "span_id")
#: AnyValue's kinds that are JSON scalars as they are (an int64 stays an integer).
_SCALARS = frozenset({"string_value", "int_value", "bool_value"})
#: The sizes of valid ids (logs.proto): an id of another length, or all zeroes, is invalid,
#: and receivers are to treat the record as having none.
TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8


class LogEntry(NamedTuple):
    """One LogRecord as an entry: its JSON payload, the same value parsed, and its subject (or None)."""

    payload: bytes
    value: dict[str, object]
    subject: str | None


def decode_request(body: bytes, encoding: Encoding) -> ExportLogsServiceRequest:
    """The request `body` holds; MalformedOtlp when it is not an ExportLogsServiceRequest in `encoding`."""
    request = ExportLogsServiceRequest()
    if encoding == "protobuf":
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise MalformedOtlp(f"the body is not a protobuf ExportLogsServiceRequest: {exc}") from None
        return request
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedOtlp(f"the body is not valid JSON: {exc.msg} (at {exc.pos})") from None
    if not isinstance(value, dict):
        raise MalformedOtlp("the body must be a JSON object (an ExportLogsServiceRequest)")
    for record in _json_records(value):
        _hex_ids_to_base64(record)
    try:
        json_format.ParseDict(value, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError) as exc:
        raise MalformedOtlp(f"the body is not an OTLP/JSON ExportLogsServiceRequest: {exc}") from None
    return request


def _json_records(value: dict[str, object]) -> Iterator[dict[str, object]]:
    """The LogRecord objects of a parsed OTLP/JSON request, wherever its shape allows (the parser judges the rest)."""
    for resource_logs in _objects(value, "resourceLogs", "resource_logs"):
        for scope_logs in _objects(resource_logs, "scopeLogs", "scope_logs"):
            yield from _objects(scope_logs, "logRecords", "log_records")


def _objects(value: dict[str, object], *names: str) -> Iterator[dict[str, object]]:
    for name in names:
        items = value.get(name)
        if isinstance(items, list):
            yield from (item for item in items if isinstance(item, dict))


def _hex_ids_to_base64(record: dict[str, object]) -> None:
    """Rewrite OTLP/JSON's hex ids as the base64 protobuf's JSON parser expects for bytes fields."""
    for name in _HEX_ID_FIELDS:
        text = record.get(name)
        if not isinstance(text, str):
            continue
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise MalformedOtlp(f"{name} {text[:40]!r} is not a hex string") from None
        record[name] = base64.b64encode(raw).decode("ascii")


def log_entries(request: ExportLogsServiceRequest, subject_attribute: str) -> list[LogEntry]:
    """Every LogRecord of `request` as an entry, in request order.

    The subject is the string value of `subject_attribute` among the record's attributes,
    else among its resource's; None when neither holds a usable one (subject_of).
    """
    entries: list[LogEntry] = []
    for resource_logs in request.resource_logs:
        resource = attributes(resource_logs.resource.attributes)
        resource_subject = subject_of(resource.get(subject_attribute))
        for scope_logs in resource_logs.scope_logs:
            scope_message = scope_logs.scope
            scope: dict[str, object] = {"name": scope_message.name, "version": scope_message.version}
            if scope_message.attributes:
                scope["attributes"] = attributes(scope_message.attributes)
            for record in scope_logs.log_records:
                record_attributes = attributes(record.attributes)
                value = log_record(record, record_attributes, resource, scope)
                subject = subject_of(record_attributes.get(subject_attribute)) if record_attributes else None
                entries.append(LogEntry(orjson.dumps(value), value, subject or resource_subject))
    return entries


def log_record(
    record: LogRecord, record_attributes: dict[str, object], resource: dict[str, object], scope: dict[str, object]
) -> dict[str, object]:
    """One LogRecord's payload (docs/otlp.md): its fields, its mapped attributes, its resource's and its scope."""
    value: dict[str, object] = {
        "body": any_value(record.body) if record.HasField("body") else None,
        "severity_number": record.severity_number,
        "severity_text": record.severity_text,
        "time_unix_nano": record.time_unix_nano,
        "observed_time_unix_nano": record.observed_time_unix_nano,
        "trace_id": valid_id(record.trace_id, TRACE_ID_BYTES),
        "span_id": valid_id(record.span_id, SPAN_ID_BYTES),
        "flags": record.flags,
        "attributes": record_attributes,
        "resource": resource,
        "scope": scope,
    }
    if record.event_name:
        value["event_name"] = record.event_name
    if record.dropped_attributes_count:
        value["dropped_attributes_count"] = record.dropped_attributes_count
    return value


def valid_id(raw: bytes, size: int) -> str | None:
    """A trace or span id as lowercase hex; None when absent or invalid (not `size` bytes, or all zeroes)."""
    if len(raw) != size or not any(raw):
        return None
    return raw.hex()


def attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    """Key-value pairs as a JSON object; of a key given twice, the last wins."""
    return {pair.key: any_value(pair.value) for pair in pairs}


def any_value(value: AnyValue) -> object:
    """An AnyValue as JSON: scalars as such (see double), arrays, kvlists as objects, bytes as base64, empty as null."""
    kind = value.WhichOneof("value")
    if kind in _SCALARS:
        return getattr(value, kind)
    if kind == "double_value":
        return double(value.double_value)
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "bytes_value":
        # As OTLP/JSON writes bytes (protobuf's JSON mapping), so a reader decodes one way.
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


def double(number: float) -> float | str:
    """A double as JSON: a number, or for NaN and the infinities, which JSON has no number for, OTLP/JSON's strings.

    Encoders (orjson among them) would write null and lose the value without a word.
    """
    if math.isfinite(number):
        return number
    if math.isnan(number):
        return "NaN"
    return "Infinity" if number > 0 else "-Infinity"


def subject_of(value: object) -> str | None:
    """An attribute's value as a subject: a string of 1 to MAX_SUBJECT_LENGTH characters without control characters.

    Anything else gives no subject (the value is still in the payload): a record is not
    refused for an attribute that only names it.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SUBJECT_LENGTH:
        return None
    if not value.isprintable():
        return None
    return value
