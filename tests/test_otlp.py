"""POST /v1/logs: OpenTelemetry logs over OTLP/HTTP, each LogRecord one entry, durably.

In-process tests run the Falcon app on a real service (tests/test_http.py's Harness and
Node) and build requests with opentelemetry-proto's own classes; a full queue is made by
holding SQLite's write lock on the destination. The later classes run real gunicorn and
real exporters: the OpenTelemetry Python SDK (protobuf, with and without gzip), a raw
protobuf client under kill -9, and the Node SDK (OTLP/JSON, marker `producers`).
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import itertools
import signal
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from nexus_gevent.config import load_settings
from nexus_gevent.errors import ConfigError
from nexus_gevent.testing import wait_until
from tests.support.proc import (
    HOST,
    Gunicorn,
    KeepAlive,
    Launcher,
    destination_locked,
    metric_sum,
    ready,
    scrape,
    wait_for,
)
from tests.support.proc import TOKEN as PROCESS_TOKEN
from tests.support.producers import program
from tests.support.services import skip_or_fail
from tests.test_http import ADMIN_TOKEN, OTHER_TOKEN, TOKEN, TWO_SOURCES_TOML, Harness, Node, assert_error, fill_queue
from tests.test_http import start_blocked as start_blocked_node

pytest_plugins = ["tests.support.postgres"]

PROTOBUF = "application/x-protobuf"
TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")
#: 2023-11-14T22:13:20Z in nanoseconds: past 2**53, so an exact integer is what is checked.
TIME_NS = 1_700_000_000_000_000_001


# -- building requests with opentelemetry-proto ----------------------------------------


#: Python scalar type -> its AnyValue field (bool before int: a bool is an int too).
_SCALAR_FIELDS = ((str, "string_value"), (bool, "bool_value"), (int, "int_value"), (float, "double_value"))


def any_value(value: object) -> AnyValue:
    """A Python value as an AnyValue (str, bool, int, float, bytes, list, dict, None)."""
    if value is None:
        return AnyValue()
    for kind, name in _SCALAR_FIELDS:
        if isinstance(value, kind):
            message = AnyValue()
            setattr(message, name, value)
            return message
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    assert isinstance(value, dict)
    return AnyValue(kvlist_value=KeyValueList(values=key_values(value)))


def key_values(values: Mapping[str, object]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in values.items()]


def record(body: object, *, attributes: Mapping[str, object] | None = None, **fields: Any) -> LogRecord:
    """A LogRecord with `body` and `attributes`; other LogRecord fields as keywords."""
    return LogRecord(body=any_value(body), attributes=key_values(attributes or {}), **fields)


def resource_logs(
    records: list[LogRecord],
    *,
    service: str | None = "checkout",
    resource: Mapping[str, object] | None = None,
    scope: InstrumentationScope | None = None,
) -> ResourceLogs:
    """One resource (service.name = `service` unless None, plus `resource`) and one scope holding `records`."""
    attrs: dict[str, object] = {"service.name": service} if service is not None else {}
    attrs.update(resource or {})
    return ResourceLogs(
        resource=Resource(attributes=key_values(attrs)),
        scope_logs=[
            ScopeLogs(scope=scope or InstrumentationScope(name="app.orders", version="1.2.0"), log_records=records)
        ],
    )


def wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: its tag, the payload's length (varints) and the payload."""

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def export_request(*resources: ResourceLogs) -> bytes:
    return ExportLogsServiceRequest(resource_logs=list(resources)).SerializeToString()


def bodies(n: int, *, prefix: str = "line") -> bytes:
    """A protobuf request of `n` records whose bodies are "<prefix> 0", "<prefix> 1", ..."""
    return export_request(resource_logs([record(f"{prefix} {i}") for i in range(n)]))


def post_logs(
    node: Node,
    body: bytes,
    *,
    content_type: str | None = PROTOBUF,
    token: str | None = TOKEN,
    headers: Mapping[str, str] | None = None,
) -> falcon.testing.Result:
    sent: dict[str, str] = {}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        sent["Content-Type"] = content_type
    sent.update(headers or {})
    return node.client.simulate_post("/v1/logs", body=body, headers=sent)


def response_of(result: falcon.testing.Result) -> ExportLogsServiceResponse:
    """The ExportLogsServiceResponse of a protobuf 200."""
    assert result.status_code == 200, result.text
    assert result.headers["content-type"] == PROTOBUF
    return ExportLogsServiceResponse.FromString(result.content)


def stored(node: Node, count: int) -> list[dict[str, Any]]:
    """Wait until `count` rows are delivered; every row, its payload parsed, oldest first."""
    wait_until(lambda: len(node.rows()) >= count, what=f"{count} rows delivered")
    rows = node.rows()
    for row in rows:
        row["payload"] = orjson.loads(row["payload"])
    return rows


# -- in process ----------------------------------------------------------------------


class TestMapping:
    """Each LogRecord becomes one entry whose payload keeps what a reader needs (docs/otlp.md)."""

    def test_each_record_is_one_row_and_the_answer_is_an_empty_export_response(self, node: Node) -> None:
        """Three records: 200 with an empty protobuf ExportLogsServiceResponse, three rows, one payload_id each."""
        result = post_logs(node, bodies(3))

        assert not response_of(result).HasField("partial_success")
        rows = stored(node, 3)
        assert sorted(row["payload"]["body"] for row in rows) == ["line 0", "line 1", "line 2"]
        assert len({row["payload_id"] for row in rows}) == 3
        assert {row["source"] for row in rows} == {"default"}

    def test_a_record_maps_to_the_documented_payload(self, node: Node) -> None:
        """Body, severity, times, hex ids, flags, attributes of each AnyValue kind, resource, scope: as documented."""
        log = record(
            {"msg": "paid", "items": [1, 2.5, True, None], "raw": b"\x00\xff"},
            attributes={"http.status": 200, "user": {"id": "u1"}},
            severity_number=9,
            severity_text="INFO",
            time_unix_nano=TIME_NS,
            observed_time_unix_nano=TIME_NS + 1,
            trace_id=TRACE_ID,
            span_id=SPAN_ID,
            flags=1,
            event_name="order.paid",
        )
        scope = InstrumentationScope(name="app.orders", version="1.2.0", attributes=key_values({"lib": "x"}))

        post_logs(node, export_request(resource_logs([log], resource={"host.name": "web-1"}, scope=scope)))

        (row,) = stored(node, 1)
        assert row["payload"] == {
            "body": {"msg": "paid", "items": [1, 2.5, True, None], "raw": base64.b64encode(b"\x00\xff").decode()},
            "severity_number": 9,
            "severity_text": "INFO",
            "time_unix_nano": TIME_NS,
            "observed_time_unix_nano": TIME_NS + 1,
            "trace_id": TRACE_ID.hex(),
            "span_id": SPAN_ID.hex(),
            "flags": 1,
            "attributes": {"http.status": 200, "user": {"id": "u1"}},
            "resource": {"service.name": "checkout", "host.name": "web-1"},
            "scope": {"name": "app.orders", "version": "1.2.0", "attributes": {"lib": "x"}},
            "event_name": "order.paid",
        }
        assert row["subject"] == "checkout"

    def test_a_bare_record_has_null_body_and_ids_and_zero_times(self, node: Node) -> None:
        """A LogRecord with nothing set: body, trace_id and span_id null; times, severity and flags 0."""
        post_logs(node, export_request(resource_logs([LogRecord()], service=None)))

        (row,) = stored(node, 1)
        payload = row["payload"]
        assert (payload["body"], payload["trace_id"], payload["span_id"]) == (None, None, None)
        assert (payload["time_unix_nano"], payload["severity_number"], payload["flags"]) == (0, 0, 0)
        assert payload["attributes"] == payload["resource"] == {}
        assert row["subject"] is None

    def test_nan_and_infinite_doubles_are_kept_as_otlp_jsons_strings(self, node: Node) -> None:
        """Doubles JSON has no number for (NaN, +-Infinity): stored as "NaN", "Infinity", "-Infinity", not null."""
        log = record([float("nan"), float("inf"), 1.5], attributes={"ratio": float("-inf")})

        post_logs(node, export_request(resource_logs([log])))

        (row,) = stored(node, 1)
        assert row["payload"]["body"] == ["NaN", "Infinity", 1.5]
        assert row["payload"]["attributes"] == {"ratio": "-Infinity"}

    @pytest.mark.parametrize(
        ("trace_id", "span_id"),
        [(bytes(16), bytes(8)), (TRACE_ID[:15], SPAN_ID[:7]), (TRACE_ID + b"\x01", SPAN_ID + b"\x01")],
        ids=["all-zeroes", "short", "long"],
    )
    def test_an_invalid_trace_or_span_id_is_null(self, node: Node, trace_id: bytes, span_id: bytes) -> None:
        """Ids of all zeroes or of another length than 16 and 8 bytes are invalid (logs.proto): stored as null."""
        post_logs(node, export_request(resource_logs([record("x", trace_id=trace_id, span_id=span_id)])))

        (row,) = stored(node, 1)
        assert (row["payload"]["trace_id"], row["payload"]["span_id"]) == (None, None)
        assert row["payload"]["body"] == "x"

    def test_an_otlp_json_id_of_the_wrong_length_is_null(self, node: Node) -> None:
        """OTLP/JSON hex ids that do not decode to 16 and 8 bytes: the record is stored, its ids null."""
        ids = {"traceId": "5b8e", "spanId": "0000000000000000", "body": {"stringValue": "x"}}
        body = orjson.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [ids]}]}]})

        result = post_logs(node, body, content_type="application/json")

        assert result.status_code == 200, result.text
        (row,) = stored(node, 1)
        assert (row["payload"]["trace_id"], row["payload"]["span_id"]) == (None, None)

    def test_otlp_json_with_hex_ids_enum_ints_and_string_int64s_maps_the_same(self, node: Node) -> None:
        """The specification's OTLP/JSON (lowerCamelCase, hex ids, int enum, int64 as string): same payload, 200 {}."""
        body = orjson.dumps(
            {
                "resourceLogs": [
                    {
                        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "checkout"}}]},
                        "scopeLogs": [
                            {
                                "scope": {"name": "app.orders", "version": "1.2.0"},
                                "logRecords": [
                                    {
                                        "timeUnixNano": str(TIME_NS),
                                        "observedTimeUnixNano": str(TIME_NS + 1),
                                        "severityNumber": 9,
                                        "severityText": "INFO",
                                        "traceId": TRACE_ID.hex(),
                                        "spanId": SPAN_ID.hex(),
                                        "body": {"stringValue": "paid"},
                                        "attributes": [{"key": "http.status", "value": {"intValue": "200"}}],
                                        "someFutureField": {"ignored": True},
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        )

        result = post_logs(node, body, content_type="application/json; charset=utf-8")

        assert result.status_code == 200, result.text
        assert result.headers["content-type"] == "application/json"
        assert result.json == {}
        (row,) = stored(node, 1)
        payload = row["payload"]
        assert (payload["trace_id"], payload["span_id"]) == (TRACE_ID.hex(), SPAN_ID.hex())
        assert (payload["time_unix_nano"], payload["severity_number"]) == (TIME_NS, 9)
        assert payload["attributes"] == {"http.status": 200}
        assert payload["body"] == "paid"
        assert row["subject"] == "checkout"

    def test_otlp_json_with_protobufs_original_field_names_is_taken_too(self, node: Node) -> None:
        """snake_case keys (resource_logs, log_records, trace_id...), as some encoders write them: mapped the same."""
        body = orjson.dumps(
            {
                "resource_logs": [
                    {"scope_logs": [{"log_records": [{"trace_id": TRACE_ID.hex(), "body": {"string_value": "snake"}}]}]}
                ]
            }
        )

        result = post_logs(node, body, content_type="application/json")

        assert result.status_code == 200, result.text
        (row,) = stored(node, 1)
        assert (row["payload"]["body"], row["payload"]["trace_id"]) == ("snake", TRACE_ID.hex())

    def test_records_of_two_resources_each_take_their_own_subject(self, node: Node) -> None:
        """One request from two services: every row's subject is its own resource's service.name."""
        body = export_request(
            resource_logs([record("a0"), record("a1")], service="api"),
            resource_logs([record("b0")], service="billing"),
        )

        post_logs(node, body)

        rows = stored(node, 3)
        assert sorted((row["payload"]["body"], row["subject"]) for row in rows) == [
            ("a0", "api"),
            ("a1", "api"),
            ("b0", "billing"),
        ]

    def test_a_record_attribute_wins_over_the_resource_for_the_subject(self, node: Node) -> None:
        """service.name on the record itself names its subject, before the resource's."""
        post_logs(node, export_request(resource_logs([record("x", attributes={"service.name": "worker"})])))

        (row,) = stored(node, 1)
        assert row["subject"] == "worker"

    @pytest.mark.parametrize("value", [42, "", "x" * 256, "tab\there"])
    def test_an_unusable_subject_value_gives_no_subject_and_the_record_is_stored(
        self, node: Node, value: object
    ) -> None:
        """A non-string, empty, over-long or control-character service.name: stored, subject null, value kept."""
        post_logs(node, export_request(resource_logs([record("x")], service=None, resource={"service.name": value})))

        (row,) = stored(node, 1)
        assert row["subject"] is None
        assert row["payload"]["resource"] == {"service.name": value}

    def test_a_source_can_take_its_subject_from_another_attribute(self, harness: Harness) -> None:
        """otlp_subject_attribute = "host.name" in the source's table: the subject is the host."""
        toml = '[[sources]]\nname = "default"\notlp_subject_attribute = "host.name"\n'
        node = harness.start({"NEXUS_CONFIG": harness.config_file(toml)})

        post_logs(node, export_request(resource_logs([record("x")], resource={"host.name": "web-1"})))

        (row,) = stored(node, 1)
        assert row["subject"] == "web-1"

    def test_an_empty_request_is_200_and_stores_nothing(self, node: Node) -> None:
        """An ExportLogsServiceRequest without records is a success with nothing to store."""
        result = post_logs(node, b"")

        assert not response_of(result).HasField("partial_success")
        assert node.wal_pending == 0

    @pytest.mark.parametrize("body", [b"{}", b'{"resourceLogs": []}', b'{"resourceLogs": [{"scopeLogs": [{}]}]}'])
    def test_an_empty_otlp_json_request_is_200_and_stores_nothing(self, node: Node, body: bytes) -> None:
        """OTLP/JSON without records (none, or an empty scope): 200 with an empty JSON response, nothing written."""
        result = post_logs(node, body, content_type="application/json")

        assert result.status_code == 200, result.text
        assert result.json == {}
        assert node.wal_pending == 0


class TestSubjectSetting:
    """otlp_subject_attribute per [[sources]] table, NEXUS_OTLP_SUBJECT_ATTRIBUTE for `default`."""

    def test_service_name_unless_set(self, tmp_path: Path) -> None:
        """Without a setting every source takes its subject from service.name."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path)})

        assert settings.sources[0].otlp_subject_attribute == "service.name"

    def test_the_variable_sets_the_default_sources_attribute(self, tmp_path: Path) -> None:
        """NEXUS_OTLP_SUBJECT_ATTRIBUTE names the attribute of the implicit source `default`."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_OTLP_SUBJECT_ATTRIBUTE": "k8s.pod.name"})

        assert settings.sources[0].otlp_subject_attribute == "k8s.pod.name"

    def test_each_source_table_has_its_own(self, tmp_path: Path) -> None:
        """A [[sources]] table's otlp_subject_attribute is that source's; one without keeps service.name."""
        config = tmp_path / "nexus.toml"
        config.write_text(f'{TWO_SOURCES_TOML}\n[[sources]]\nname = "edge"\notlp_subject_attribute = "host.name"\n')

        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_CONFIG": str(config)})

        names = {s.name: s.otlp_subject_attribute for s in settings.sources}
        assert names == {"default": "service.name", "other": "service.name", "edge": "host.name"}

    @pytest.mark.parametrize("value", ['""', "5"])
    def test_an_attribute_that_is_not_a_name_is_refused(self, tmp_path: Path, value: str) -> None:
        """An empty or non-string otlp_subject_attribute is a ConfigError naming the setting."""
        config = tmp_path / "nexus.toml"
        config.write_text(f'[[sources]]\nname = "billing"\notlp_subject_attribute = {value}\n')

        with pytest.raises(ConfigError, match="otlp_subject_attribute"):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_CONFIG": str(config)})


class TestRefusals:
    """Malformed requests, other media types and codings, sizes: 4xx in the API's shape, nothing stored."""

    @pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc", b"not protobuf at all"])
    def test_a_body_that_is_not_an_export_request_is_400(self, node: Node, body: bytes) -> None:
        """Bytes protobuf cannot decode as an ExportLogsServiceRequest: 400 invalid_body naming protobuf."""
        result = post_logs(node, body)

        answer = assert_error(result, 400, "invalid_body")
        assert "protobuf" in answer["message"]
        assert node.wal_pending == 0

    @pytest.mark.parametrize(
        "body",
        [
            b"{not json",
            b"[]",
            b'{"resourceLogs": "x"}',
            b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "zz"}]}]}]}',
            b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": "soon"}]}]}]}',
        ],
    )
    def test_malformed_otlp_json_is_400(self, node: Node, body: bytes) -> None:
        """Not JSON, not an object, a wrong type, a traceId that is not hex, a time that is not a number: 400."""
        result = post_logs(node, body, content_type="application/json")

        assert_error(result, 400, "invalid_body")
        assert node.wal_pending == 0

    def test_nesting_past_protobufs_limit_is_400(self, node: Node) -> None:
        """A body nested deeper than protobuf's recursion limit is refused whole, not crashed on."""
        # Built on the wire by hand: protobuf itself refuses to build what it would not parse.
        value = AnyValue(string_value="leaf").SerializeToString()
        for _ in range(120):
            value = wire_field(5, wire_field(1, value))  # AnyValue.array_value -> ArrayValue.values
        body = wire_field(1, wire_field(2, wire_field(2, wire_field(5, value))))  # resource, scope, record, body

        result = post_logs(node, body)

        assert_error(result, 400, "invalid_body")
        assert node.wal_pending == 0

    def test_otlp_json_nested_past_protobufs_limit_is_400(self, node: Node) -> None:
        """OTLP/JSON whose body nests deeper than protobuf's JSON parser goes: 400, nothing stored."""
        value = b'{"stringValue": "leaf"}'
        for _ in range(120):
            value = b'{"arrayValue": {"values": [' + value + b"]}}"
        body = b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": ' + value + b"}]}]}]}"

        result = post_logs(node, body, content_type="application/json")

        assert_error(result, 400, "invalid_body")
        assert node.wal_pending == 0

    @pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-ndjson", "application/grpc"])
    def test_another_or_no_content_type_is_415(self, node: Node, content_type: str | None) -> None:
        """OTLP/HTTP names its two encodings; anything else, or nothing, is 415 listing them."""
        result = post_logs(node, bodies(1), content_type=content_type)

        answer = assert_error(result, 415, "unsupported_media_type")
        assert "application/x-protobuf" in answer["details"]["accepted_types"]

    def test_a_gzip_body_is_decoded(self, node: Node) -> None:
        """Content-Encoding: gzip, as exporters send with compression on: decoded, stored."""
        result = post_logs(node, gzip.compress(bodies(2)), headers={"Content-Encoding": "gzip"})

        assert response_of(result) == ExportLogsServiceResponse()
        assert sorted(row["payload"]["body"] for row in stored(node, 2)) == ["line 0", "line 1"]

    def test_a_body_that_is_not_gzip_is_400_invalid_encoding(self, node: Node) -> None:
        """Content-Encoding: gzip on bytes that are not gzip: 400 invalid_encoding, nothing stored."""
        result = post_logs(node, bodies(2), headers={"Content-Encoding": "gzip"})

        assert_error(result, 400, "invalid_encoding")
        assert node.wal_pending == 0

    def test_the_size_limit_applies_to_the_decoded_body(self, harness: Harness) -> None:
        """A small gzip body that decodes past NEXUS_MAX_BODY_BYTES is 413, nothing stored."""
        node = harness.start({"NEXUS_MAX_BODY_BYTES": "4096"})
        body = export_request(resource_logs([record("x" * 8000)]))
        compressed = gzip.compress(body)
        assert len(compressed) < 4096

        result = post_logs(node, compressed, headers={"Content-Encoding": "gzip"})

        assert_error(result, 413, "payload_too_large")
        assert node.wal_pending == 0

    def test_more_records_than_a_batch_may_hold_is_413(self, harness: Harness) -> None:
        """More LogRecords than NEXUS_MAX_BATCH_ENTRIES: 413 batch_too_large, nothing stored."""
        node = harness.start({"NEXUS_MAX_BATCH_ENTRIES": "5"})

        result = post_logs(node, bodies(6))

        answer = assert_error(result, 413, "batch_too_large")
        assert answer["details"] == {"entries": 6, "max_batch_entries": 5}
        assert node.wal_pending == 0


class TestCredentials:
    """The source is the token's: Bearer or Basic as on /inbound; no token 401, the admin's 403."""

    @pytest.mark.parametrize("token", [None, "wrong-token"])
    def test_no_known_token_is_401_with_both_challenges(self, node: Node, token: str | None) -> None:
        """A missing or unknown token: 401 unauthorized, WWW-Authenticate offering Bearer and Basic."""
        result = post_logs(node, bodies(1), token=token)

        assert_error(result, 401, "unauthorized")
        assert "Basic" in result.headers["www-authenticate"]
        assert node.wal_pending == 0

    def test_the_admin_token_is_403(self, node: Node) -> None:
        """The admin token writes no entries."""
        assert_error(post_logs(node, bodies(1), token=ADMIN_TOKEN), 403, "source_mismatch")

    def test_basic_with_the_token_as_password_is_accepted(self, node: Node) -> None:
        """Authorization: Basic user:token, as exporters configured with basic auth send it."""
        basic = base64.b64encode(f"otel:{TOKEN}".encode()).decode()

        result = post_logs(node, bodies(1), token=None, headers={"Authorization": f"Basic {basic}"})

        assert result.status_code == 200, result.text
        stored(node, 1)

    def test_each_token_writes_as_its_own_source(self, harness: Harness) -> None:
        """Records sent with source `other`'s token are rows of source `other`."""
        node = harness.start({"NEXUS_CONFIG": harness.config_file(TWO_SOURCES_TOML)})

        post_logs(node, bodies(1, prefix="mine"))
        post_logs(node, bodies(1, prefix="theirs"), token=OTHER_TOKEN)

        rows = stored(node, 2)
        assert {(row["payload"]["body"], row["source"]) for row in rows} == {
            ("mine 0", "default"),
            ("theirs 0", "other"),
        }


class TestOverload:
    """A full queue answers 429 with Retry-After, which exporters retry; a resend stores nothing new."""

    def test_a_shed_request_is_429_stored_and_its_resend_is_200_storing_nothing(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """Durable policy, full queue: 429 with Retry-After and payload_ids (stored); the same bytes again: 200."""
        node, lock = start_blocked_node(harness, request, {"NEXUS_SHED_POLICY": "durable"})
        fill_queue(node)
        body = bodies(3, prefix="shed")

        first = post_logs(node, body)
        answer = assert_error(first, 429, "queue_full", extra=frozenset({"payload_ids"}))
        assert int(first.headers["retry-after"]) >= 1
        assert answer["details"]["durable"] is True
        assert len(answer["payload_ids"]) == 3

        again = post_logs(node, body)
        assert response_of(again) == ExportLogsServiceResponse()

        lock.release()
        rows = stored(node, 5)
        node.wait_settled()
        shed = [row for row in node.rows() if orjson.loads(row["payload"]).get("body", "").startswith("shed")]
        assert sorted(row["payload_id"] for row in shed) == sorted(answer["payload_ids"])
        assert len(rows) == 5

    def test_a_durable_429s_retry_after_leaves_the_resend_inside_the_window(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """A backlog asking a longer wait: Retry-After is capped at half the resend window, so the resend counts."""
        env = {"NEXUS_SHED_POLICY": "durable", "NEXUS_SHED_RESEND_WINDOW": "4"}
        node, _lock = start_blocked_node(harness, request, env)
        fill_queue(node)
        # The backlog (what the node holds, plus this request's records) asks for 10 s at the floor rate.
        body = bodies(8, prefix="backlog")

        first = post_logs(node, body)

        answer = assert_error(first, 429, "queue_full", extra=frozenset({"payload_ids"}))
        assert first.headers["retry-after"] == "2"
        assert answer["retry_after_seconds"] == 2

    def test_under_reject_a_full_queue_is_429_and_stores_nothing(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """Reject policy, full queue: 429 with Retry-After, durable false, nothing of the request written."""
        node, _lock = start_blocked_node(harness, request, {"NEXUS_SHED_POLICY": "reject"})
        fill_queue(node)
        pending = node.wal_pending

        result = post_logs(node, bodies(2))

        answer = assert_error(result, 429, "queue_full")
        assert answer["details"]["durable"] is False
        assert node.wal_pending == pending

    def test_an_idempotency_key_names_the_request(self, node: Node) -> None:
        """The same Idempotency-Key again (a Collector can set headers): 200, and the records are stored once."""
        key = {"Idempotency-Key": "export-1"}

        assert post_logs(node, bodies(2), headers=key).status_code == 200
        assert post_logs(node, bodies(2, prefix="other"), headers=key).status_code == 200

        node.wait_settled()
        assert sorted(row["payload"]["body"] for row in stored(node, 2)) == ["line 0", "line 1"]

    def test_a_request_larger_than_the_rate_limit_burst_is_413(self, harness: Harness) -> None:
        """More records than the source's burst could never pass its limit: 413, not a 429 retried for ever."""
        node = harness.start({"NEXUS_RATE_LIMIT_PER_SECOND": "1", "NEXUS_RATE_LIMIT_BURST": "2"})

        answer = assert_error(post_logs(node, bodies(3)), 413, "batch_too_large")

        assert answer["details"]["rate_limit_burst"] == 2


@pytest.mark.postgres
class TestPartialSuccess:
    """Records the destination can never store are reported in partial_success; the others are stored."""

    @pytest.fixture
    def pg_node(self, harness: Harness, postgres_db_url: str) -> Node:
        return harness.start({"NEXUS_DESTINATION_URL": postgres_db_url})

    @staticmethod
    def pg_bodies(url: str) -> list[object]:
        import psycopg  # here: psycopg decides at import whether it cooperates with gevent

        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute("SELECT payload -> 'body' FROM nexus_entries ORDER BY payload ->> 'body'").fetchall()
        return [row[0] for row in rows]

    def test_a_record_postgresql_cannot_hold_is_rejected_and_the_rest_stored(
        self, pg_node: Node, postgres_db_url: str
    ) -> None:
        """A NUL in one record's body (JSONB cannot hold it): partial_success 1 naming record 1; the others stored."""
        body = export_request(resource_logs([record("ok 0"), record("bad\x00nul"), record("ok 2")]))

        response = response_of(post_logs(pg_node, body))

        assert response.partial_success.rejected_log_records == 1
        assert "log record 1" in response.partial_success.error_message
        assert "PostgreSQL" in response.partial_success.error_message
        pg_node.wait_settled()
        assert self.pg_bodies(postgres_db_url) == ["ok 0", "ok 2"]

    def test_the_json_answer_reports_partial_success_in_otlp_json(self, pg_node: Node, postgres_db_url: str) -> None:
        """An OTLP/JSON request gets partialSuccess with rejectedLogRecords and errorMessage, in JSON."""
        request = ExportLogsServiceRequest(resource_logs=[resource_logs([record("bad\x00"), record("fine")])])
        body = orjson.dumps(json_format.MessageToDict(request))

        result = post_logs(pg_node, body, content_type="application/json")

        assert result.status_code == 200, result.text
        partial = result.json["partialSuccess"]
        assert int(partial["rejectedLogRecords"]) == 1
        assert "log record 0" in partial["errorMessage"]
        pg_node.wait_settled()
        assert self.pg_bodies(postgres_db_url) == ["fine"]

    def test_a_request_of_rejected_records_only_stores_nothing(self, pg_node: Node) -> None:
        """Every record unstorable: 200 with partial_success counting all of them, nothing written."""
        body = export_request(resource_logs([record("a\x00"), record({"k": "b\x00"})]))

        response = response_of(post_logs(pg_node, body))

        assert response.partial_success.rejected_log_records == 2
        assert pg_node.wal_pending == 0


# -- real gunicorn, real exporters -----------------------------------------------------

#: Records the Python SDK emits in one test: more than one export batch of BATCH_SIZE.
SDK_RECORDS = 120
#: The SDK's export batch: several requests per test.
SDK_BATCH_SIZE = 50


def gunicorn_rows(db_path: Path) -> list[dict[str, Any]]:
    """Every row of a gunicorn's SQLite destination, its payload parsed, oldest first."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute("SELECT * FROM nexus_entries ORDER BY seq").fetchall()
        except sqlite3.OperationalError:
            return []
    rows = [dict(row) for row in found]
    for row in rows:
        row["payload"] = orjson.loads(row["payload"])
    return rows


def wait_rows(server: Gunicorn, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Wait until `server` delivered at least `count` rows; every row."""
    wait_for(
        lambda: len(gunicorn_rows(server.db_path)) >= count,
        timeout,
        f"{count} rows delivered",
        describe=lambda: f"{len(gunicorn_rows(server.db_path))} rows so far\n{server.log_tail()}",
    )
    return gunicorn_rows(server.db_path)


class PythonSdk:
    """The OpenTelemetry Python SDK as an application sets it up: LoggerProvider, BatchLogRecordProcessor, OTLP/HTTP.

    The exporter is the SDK's own OTLPLogExporter; it is subclassed only to record what
    each of its export() calls returned (and for how many records), which the SDK
    otherwise reports only in its log.
    """

    def __init__(self, port: int, *, service: str, gzip_on: bool = False, timeout: float = 30.0) -> None:
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
        from opentelemetry.sdk.resources import Resource as SdkResource

        results: list[tuple[int, bool]] = []
        self.results = results

        class RecordingExporter(OTLPLogExporter):
            def export(self, batch: Any) -> LogRecordExportResult:
                result = super().export(batch)
                results.append((len(batch), result == LogRecordExportResult.SUCCESS))
                return result

        exporter = RecordingExporter(
            endpoint=f"http://{HOST}:{port}/v1/logs",
            headers={"Authorization": f"Bearer {PROCESS_TOKEN}"},
            compression=Compression.Gzip if gzip_on else Compression.NoCompression,
            timeout=timeout,
        )
        self.provider = LoggerProvider(resource=SdkResource.create({"service.name": service}))
        # A long schedule: export happens at force_flush, in batches of SDK_BATCH_SIZE.
        processor = BatchLogRecordProcessor(
            exporter, max_export_batch_size=SDK_BATCH_SIZE, schedule_delay_millis=60_000, max_queue_size=4096
        )
        self.provider.add_log_record_processor(processor)
        self.logger = self.provider.get_logger("tests.otlp", "1.0.0")

    def emit(self, bodies: list[str]) -> None:
        from opentelemetry._logs import SeverityNumber

        for n, body in enumerate(bodies):
            self.logger.emit(body=body, severity_number=SeverityNumber.INFO, severity_text="INFO", attributes={"n": n})

    def flush(self, timeout_millis: int = 120_000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.provider.shutdown()


@pytest.mark.process
class TestPythonSdk:
    """The OpenTelemetry Python SDK's OTLP/HTTP exporter (protobuf) against a real gunicorn."""

    @pytest.mark.parametrize("gzip_on", [False, True], ids=["plain", "gzip"])
    def test_every_emitted_record_is_one_row_with_its_body_and_service(self, launch: Launcher, gzip_on: bool) -> None:
        """N records from a LoggerProvider (service.name "shop"): N rows with body and service; each export succeeds."""
        # Given a two-worker service and an SDK pointed at it
        server = ready(launch(workers=2))
        sdk = PythonSdk(server.port, service="shop", gzip_on=gzip_on)
        bodies = [f"sdk record {i}" for i in range(SDK_RECORDS)]
        try:
            # When the application logs N records and the processor exports them
            sdk.emit(bodies)
            assert sdk.flush()
        finally:
            sdk.shutdown()

        # Then every export call succeeded, and covered every record
        assert sdk.results, "the exporter was never called"
        assert all(ok for _n, ok in sdk.results), sdk.results
        assert sum(n for n, _ok in sdk.results) == SDK_RECORDS
        # ... and each record is one row, with its body, its service as resource and subject
        rows = wait_rows(server, SDK_RECORDS)
        assert sorted(row["payload"]["body"] for row in rows) == sorted(bodies)
        assert {row["payload"]["resource"]["service.name"] for row in rows} == {"shop"}
        assert {row["subject"] for row in rows} == {"shop"}
        assert {row["payload"]["scope"]["name"] for row in rows} == {"tests.otlp"}
        assert {row["payload"]["severity_text"] for row in rows} == {"INFO"}

    def test_an_exporter_resending_after_a_full_queue_stores_nothing_new(self, launch: Launcher) -> None:
        """Full queue: the SDK's export is 429 (stored), it resends after Retry-After, gets 200; each record one row."""
        # Given two workers with one queue slot each, and a destination held busy
        server = ready(launch(workers=2, env=TINY_QUEUE))
        sdk = PythonSdk(server.port, service="shop", timeout=120)
        bodies = [f"resent record {i}" for i in range(RESEND_RECORDS)]
        try:
            with destination_locked(server.db_path):
                # When the SDK exports one request that the service sheds
                sdk.emit(bodies)
                assert sdk.flush()
                # Then the export ended in success, after the service answered a 429 and a resend
                assert sdk.results == [(RESEND_RECORDS, True)]
                text = scrape(server.port)
                assert metric_sum(text, "nexus_writes_shed_total") >= 1
                assert metric_sum(text, "nexus_writes_duplicate_total") == RESEND_RECORDS
        finally:
            sdk.shutdown()

        # ... and once the destination is back, each record is one row: the resend stored nothing
        wait_rows(server, RESEND_RECORDS)
        wait_for(lambda: not pending_entries(server), 60, "nothing left to deliver")
        rows = gunicorn_rows(server.db_path)
        assert sorted(row["payload"]["body"] for row in rows) == sorted(bodies)
        statuses = [r["status"] for r in server.events("request") if r.get("path") == "/v1/logs"]
        assert statuses[0] == 429
        assert statuses[-1] == 200


#: One queue slot and one delivery greenlet a worker: a request of a few records is shed.
TINY_QUEUE = {"NEXUS_QUEUE_SIZE": "1", "NEXUS_QUEUE_WORKERS": "1"}
#: Records of the shed request: few, so that its Retry-After (backlog / rate) stays short.
RESEND_RECORDS = 4


def pending_entries(server: Gunicorn) -> float:
    """WAL entries not yet delivered, over every worker (/metrics)."""
    return metric_sum(scrape(server.port), "nexus_wal_pending_entries")


#: Client threads exporting at once in the kill -9 test.
CRASH_WRITERS = 4
#: Records per export request in the kill -9 test.
CRASH_REQUEST_RECORDS = 20
#: Acknowledged records before the kill, so that there is something to lose.
CRASH_ACKED_BEFORE_KILL = 1000


@dataclass
class ExportLedger:
    """What the exporting threads sent, and which records the service acknowledged, by each record's int body.

    A 200 acknowledges every record of its request (none is refused on SQLite), and so
    does a durable 429; a request that failed on the wire loses its records (they may be
    stored: the kill may have come after the fsync but before the answer).
    """

    sent: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, markers: list[int], label: str, *, acked: bool = False, lost: bool = False) -> None:
        with self.lock:
            self.outcomes[label] += 1
            if acked:
                self.acked.update(markers)
            if lost:
                self.lost.update(markers)

    def problems(self, stored: list[object]) -> list[str]:
        """Everything that breaks "each acknowledged record stored exactly once, and nothing else stored"."""
        counts = Counter(stored)
        found = [
            f"acknowledged record {n} has {counts.get(n, 0)} rows" for n in sorted(self.acked) if counts.get(n) != 1
        ]
        for marker, rows in counts.items():
            if rows > 1:
                found.append(f"record {marker} is stored {rows} times")
            if marker not in self.sent:
                found.append(f"a row holds {marker!r}, which no request sent")
            elif marker not in self.acked and marker not in self.lost:
                found.append(f"record {marker} is stored, but its request was answered without acknowledging it")
        return found


class ProtobufExporters:
    """Threads exporting OTLP protobuf requests of unique int bodies over keep-alive connections, never resending."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ledger = ExportLedger()
        self._numbers = itertools.count()
        self._numbers_lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=CRASH_WRITERS, thread_name_prefix="otlp-exporter")
        self._futures: list[Future[None]] = []

    def start(self) -> None:
        self._futures = [self._pool.submit(self._run) for _ in range(CRASH_WRITERS)]

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout)
        self._pool.shutdown(wait=True)

    def _markers(self) -> list[int]:
        with self._numbers_lock:
            return [next(self._numbers) for _ in range(CRASH_REQUEST_RECORDS)]

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {PROCESS_TOKEN}", "Content-Type": PROTOBUF}
        with contextlib.closing(KeepAlive(self.port)) as client:
            while not self._stop.is_set():
                markers = self._markers()
                with self.ledger.lock:
                    self.ledger.sent.update(markers)
                body = export_request(resource_logs([record(n) for n in markers], service="crash"))
                try:
                    response = client.post("/v1/logs", body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    self.ledger.record(markers, f"error:{type(exc).__name__}", lost=True)
                    # Not a synchronisation: a pause so a dead port is not hammered.
                    self._stop.wait(0.01)
                    continue
                if response.status == 200:
                    partial = ExportLogsServiceResponse.FromString(response.body).partial_success
                    assert partial.rejected_log_records == 0, partial
                    self.ledger.record(markers, "200", acked=True)
                    continue
                answer = orjson.loads(response.body)
                durable = response.status == 429 and answer["details"].get("durable") is True
                self.ledger.record(markers, f"{response.status}:{answer['error']}", acked=durable)


@pytest.mark.process
class TestKill9WhileExporting:
    """kill -9 while exporters send: every record of every acknowledged request exactly once."""

    def test_kill9_mid_export_then_restart_stores_every_acknowledged_record_once(self, launch: Launcher) -> None:
        """SIGKILL of the master and both workers mid-export; after a restart each acknowledged record is one row."""
        # Given two workers taking OTLP requests continuously
        first = launch()
        first.wait_ready()
        exporters = ProtobufExporters(first.port)
        exporters.start()
        try:
            # When everything is killed with SIGKILL while requests are in flight
            wait_for(
                lambda: len(exporters.ledger.acked) >= CRASH_ACKED_BEFORE_KILL,
                60,
                "acknowledged export requests",
                describe=lambda: f"outcomes so far: {dict(exporters.ledger.outcomes)}",
            )
            first.kill9_all()
        finally:
            exporters.stop()
        ledger = exporters.ledger
        assert len(ledger.acked) >= CRASH_ACKED_BEFORE_KILL

        # Then a restart on the same data dir delivers every acknowledged record ...
        second = launch()
        second.wait_ready()

        def delivered() -> set[object]:
            return {row["payload"]["body"] for row in gunicorn_rows(second.db_path)}

        wait_for(
            lambda: ledger.acked <= delivered(),
            60,
            "every acknowledged record delivered",
            describe=lambda: f"missing: {len(ledger.acked - delivered())}\n{second.log_tail()}",
        )
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0, second.log_tail()
        # ... exactly once; rows without an ack are only from requests whose response the kill lost
        problems = ledger.problems([row["payload"]["body"] for row in gunicorn_rows(second.db_path)])
        assert problems == [], f"{problems[:20]}\noutcomes: {dict(ledger.outcomes)}\n{second.log_tail()}"


#: What the Node test installs with npm: the OpenTelemetry JS logs SDK and its OTLP/HTTP (JSON) exporter,
#: the latest line whose engines take Debian's Node 20.
NODE_PACKAGES = (
    "@opentelemetry/exporter-logs-otlp-http@0.223.1",
    "@opentelemetry/sdk-logs@0.223.1",
    "@opentelemetry/api-logs@0.223.1",
    "@opentelemetry/resources@2.12.1",
    "@opentelemetry/api@1.9.0",
)
#: Records the Node SDK emits: several export batches of NODE_BATCH_SIZE.
NODE_RECORDS = 25
NODE_BATCH_SIZE = 10

#: An application's setup: LoggerProvider with a resource, BatchLogRecordProcessor, OTLPLogExporter (OTLP/JSON).
#: export() is wrapped only to print what each call returned. Arguments: URL, token, records, batch size, compression.
NODE_SCRIPT = """
import { LoggerProvider, BatchLogRecordProcessor } from '@opentelemetry/sdk-logs';
import { OTLPLogExporter } from '@opentelemetry/exporter-logs-otlp-http';
import { resourceFromAttributes } from '@opentelemetry/resources';
import { SeverityNumber } from '@opentelemetry/api-logs';

const [url, token, count, batchSize, compression] = process.argv.slice(2);
const exporter = new OTLPLogExporter({ url, headers: { Authorization: `Bearer ${token}` }, compression });
const results = [];
const exportBatch = exporter.export.bind(exporter);
exporter.export = (logs, done) => exportBatch(logs, (result) => {
  results.push({ records: logs.length, code: result.code, error: result.error ? String(result.error) : null });
  done(result);
});
const provider = new LoggerProvider({
  resource: resourceFromAttributes({ 'service.name': 'node-shop' }),
  processors: [
    new BatchLogRecordProcessor({ exporter, maxExportBatchSize: Number(batchSize), scheduledDelayMillis: 60000 }),
  ],
});
const logger = provider.getLogger('tests.node', '1.0.0');
for (let i = 0; i < Number(count); i++) {
  logger.emit({
    body: `node record ${i}`, severityNumber: SeverityNumber.WARN, severityText: 'WARN', attributes: { n: i },
  });
}
await provider.forceFlush();
await provider.shutdown();
console.log(JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def otel_js_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the OpenTelemetry JS logs SDK and OTLP/HTTP exporter installed by npm from the registry."""
    npm = program("npm")
    program("node")
    folder = tmp_path_factory.mktemp("otel-js")
    try:
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-save", *NODE_PACKAGES],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        skip_or_fail("npm install of the OpenTelemetry JS packages took more than 300 s")
    if installed.returncode != 0:
        skip_or_fail(f"npm install of the OpenTelemetry JS packages failed: {installed.stderr[-500:]}")
    # An ES module resolves its imports from its own folder, so the script goes next to node_modules.
    (folder / "export_logs.mjs").write_text(NODE_SCRIPT)
    return folder


@pytest.mark.process
@pytest.mark.producers
class TestNodeSdk:
    """The OpenTelemetry JS SDK's OTLP/HTTP exporter (OTLP/JSON) against a real gunicorn."""

    @pytest.mark.parametrize("compression", ["none", "gzip"])
    def test_every_emitted_record_is_one_row(self, launch: Launcher, otel_js_dir: Path, compression: str) -> None:
        """N records from the Node LoggerProvider, sent as OTLP/JSON: N rows with body, severity and service."""
        # Given a service, and the Node SDK pointed at it
        server = ready(launch(workers=2))
        url = f"http://{HOST}:{server.port}/v1/logs"
        # When a Node application logs N records and the processor exports them
        result = subprocess.run(
            [
                program("node"),
                "export_logs.mjs",
                url,
                PROCESS_TOKEN,
                str(NODE_RECORDS),
                str(NODE_BATCH_SIZE),
                compression,
            ],
            cwd=otel_js_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        exports = orjson.loads(result.stdout.strip().splitlines()[-1])
        # Then every export call succeeded (ExportResultCode.SUCCESS is 0) and covered every record
        assert exports, result.stderr
        assert all(e["code"] == 0 for e in exports), exports
        assert sum(e["records"] for e in exports) == NODE_RECORDS
        # ... and each record is one row
        rows = wait_rows(server, NODE_RECORDS)
        assert sorted(row["payload"]["body"] for row in rows) == sorted(f"node record {i}" for i in range(NODE_RECORDS))
        assert {row["subject"] for row in rows} == {"node-shop"}
        assert {(row["payload"]["severity_number"], row["payload"]["severity_text"]) for row in rows} == {(13, "WARN")}
        assert sorted(row["payload"]["attributes"]["n"] for row in rows) == list(range(NODE_RECORDS))
        assert all(row["payload"]["time_unix_nano"] > 0 for row in rows)
