"""The HTTP API (contract: "HTTP API"), in-process against a real service.

Each test runs the Falcon app of one worker through `falcon.testing.TestClient`, on a
real `Service`: a WAL and a SQLite destination under `tmp_path`. Nothing is
monkey-patched: the client's calls run on the main greenlet, so delivery greenlets
run only while it waits; "delivered" is checked by polling the SQLite file with a
deadline (`wait_until` yields between looks).
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import sqlite3
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon.testing
import gevent  # type: ignore[import-untyped, unused-ignore]
import orjson
import pytest

from nexus_gevent import datadir, lifecycle
from nexus_gevent import service as service_module
from nexus_gevent._json_limits import MAX_NESTING
from nexus_gevent.backlog import Backlog
from nexus_gevent.config import load_settings
from nexus_gevent.destinations import sqlite_path
from nexus_gevent.http.app import create_app
from nexus_gevent.logs import get_logger
from nexus_gevent.queue import Queue, QueueConfig
from nexus_gevent.retry_after import RETRY_AFTER_MIN
from nexus_gevent.service import Service, WorkerState
from nexus_gevent.testing import (
    RecordingDestination,
    RecordingLogger,
    RecordingUpdater,
    make_entry,
    wait_until,
)

TOKEN = "source-token-3f9a0c"
OTHER_TOKEN = "other-token-81c2d4"
ADMIN_TOKEN = "admin-token-5d77e1"
#: Small enough that a test body crosses it with a few dozen bytes.
SMALL_BODY_LIMIT = 64
PAYLOAD_ID = re.compile(r"[0-9a-f]{32}")
ERROR_KEYS = frozenset({"error", "message", "details"})

# Two sources writing to one destination: `default` (NEXUS_TOKEN) and `other`.
TWO_SOURCES_TOML = f"""
[[sources]]
name = "default"
destination = "default"

[[sources]]
name = "other"
token = "{OTHER_TOKEN}"
destination = "default"
"""


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(result: falcon.testing.Result, status: int, code: str, *, extra: frozenset[str] = frozenset()) -> Any:
    """Check an error response has the contract's one shape, and return its body.

    ``{"error", "message", "details"}``, plus ``retry_after_seconds`` exactly when a
    Retry-After header is sent (its value), plus the keys in `extra`.
    """
    assert result.status_code == status, result.text
    assert result.headers.get("Content-Type") == "application/json"
    body = result.json
    expected = ERROR_KEYS | extra
    retry_after = result.headers.get("Retry-After")
    if retry_after is not None:
        expected |= {"retry_after_seconds"}
        assert retry_after.isdigit()
        assert int(retry_after) >= 1
        assert body["retry_after_seconds"] == int(retry_after)
    assert set(body) == expected
    assert body["error"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], dict)
    return body


class Node:
    """One started service, a TestClient on its app, and a look into its destination file."""

    def __init__(self, service: Service, logger: Any) -> None:
        self.service = service
        self.client = falcon.testing.TestClient(create_app(service, logger))

    def post(
        self,
        payload: object = None,
        *,
        body: bytes | None = None,
        source: str = "default",
        token: str | None = TOKEN,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> falcon.testing.Result:
        """POST /inbound/{source}; `payload` is sent as JSON unless a raw `body` is given."""
        sent = dict(bearer(token) if token is not None else {})
        sent.update(headers or {})
        if body is None:
            body = orjson.dumps({"n": 1} if payload is None else payload)
        return self.client.simulate_post(f"/inbound/{source}", body=body, headers=sent, **kwargs)

    def accepted(self, payload: object = None, **kwargs: Any) -> str:
        """POST, check the answer is 202, and return the payload_id."""
        result = self.post(payload, **kwargs)
        assert result.status_code == 202, result.text
        payload_id: str = result.json["payload_id"]
        return payload_id

    @property
    def db_path(self) -> str:
        return sqlite_path(self.service.settings.destination("default").url)

    def rows(self) -> list[dict[str, Any]]:
        """Every row of nexus_entries, oldest first, read with a connection of our own."""
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            found = conn.execute("SELECT * FROM nexus_entries ORDER BY seq").fetchall()
        except sqlite3.OperationalError:
            return []  # no table yet
        finally:
            conn.close()
        return [dict(row) for row in found]

    def delivered_ids(self) -> list[str]:
        return [row["payload_id"] for row in self.rows()]

    def wait_delivered(self, payload_ids: list[str]) -> None:
        """Yield to the delivery greenlets until every id is a row of nexus_entries."""
        wait_until(lambda: set(payload_ids) <= set(self.delivered_ids()), what=f"delivery of {payload_ids}")

    def wait_settled(self) -> None:
        """Yield until nothing is pending in the WAL: every accepted entry delivered and marked."""
        wal = self.service.wal
        assert wal is not None
        wait_until(lambda: wal.pending_count == 0, what="every WAL entry settled")

    @property
    def backlog(self) -> Backlog:
        return self.service.backlogs["default"]

    @property
    def wal_pending(self) -> int:
        assert self.service.wal is not None
        return self.service.wal.pending_count


def idempotency_keys(data_dir: Path) -> int:
    """How many keys the shared idempotency index holds, read with a connection of our own."""
    conn = sqlite3.connect(datadir.idempotency_file(data_dir))
    try:
        return int(conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0])
    finally:
        conn.close()


class Harness:
    """Starts services on one data directory, and shuts every one of them down at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._services: list[Service] = []

    def env(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        environ = {"NEXUS_DATA_DIR": str(self.data_dir), "NEXUS_TOKEN": TOKEN, "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN}
        environ.update(overrides or {})
        return environ

    def config_file(self, text: str) -> str:
        path = self.data_dir / "nexus.toml"
        path.write_text(text)
        return str(path)

    def start(self, env: Mapping[str, str] | None = None, *, ready: bool = True, logger: Any = None) -> Node:
        """A started service (ready unless told not to wait) and its app."""
        logger = RecordingLogger() if logger is None else logger
        service = lifecycle.assemble(load_settings(self.env(env)), logger)
        self._services.append(service)
        service.start()
        if ready:
            assert service.wait_ready(5)
        return Node(service, logger)

    def close(self) -> None:
        for service in reversed(self._services):
            service.shutdown(5)


class WriteLock:
    """SQLite's write lock on a destination file, held from the test so every delivery waits."""

    def __init__(self, path: str) -> None:
        self._conn: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self._conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.execute("ROLLBACK")
            conn.close()


@pytest.fixture
def two_sources(harness: Harness) -> Node:
    return harness.start({"NEXUS_CONFIG": harness.config_file(TWO_SOURCES_TOML)})


def start_blocked(harness: Harness, request: pytest.FixtureRequest, env: Mapping[str, str]) -> tuple[Node, WriteLock]:
    """A node with one queue slot and one delivery greenlet, whose destination is write-locked.

    The first write is taken by the delivery greenlet, which then waits for the lock;
    the second fills the queue; every later one finds the queue full.
    """
    node = harness.start({"NEXUS_QUEUE_SIZE": "1", "NEXUS_QUEUE_WORKERS": "1", **env})
    lock = WriteLock(node.db_path)
    # Released before the harness shuts the service down (fixtures end in reverse).
    request.addfinalizer(lock.release)
    return node, lock


def fill_queue(node: Node) -> list[str]:
    """Make the two writes a blocked node holds: one being delivered, one queued."""
    first = node.accepted({"fill": 1})
    # Given the delivery greenlet holds the first entry (waiting on the write lock)...
    wait_until(lambda: node.backlog.queue.depth == 0, what="the delivery greenlet took the first entry")
    # ...the second one fills the queue's one slot.
    second = node.accepted({"fill": 2})
    assert node.backlog.queue.depth == 1
    return [first, second]


@pytest.fixture
def durable_blocked(harness: Harness, request: pytest.FixtureRequest) -> tuple[Node, WriteLock]:
    return start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable"})


@pytest.fixture
def reject_blocked(harness: Harness, request: pytest.FixtureRequest) -> tuple[Node, WriteLock]:
    return start_blocked(harness, request, {"NEXUS_SHED_POLICY": "reject"})


_real_write = os.write


def failing_wal_write(fd: int, data: bytes) -> int:
    """os.write, except on the WAL's O_DSYNC segments, where the disk is full."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _real_write(fd, data)


class TestAccepted:
    """202: the entry is durable and will be delivered."""

    def test_a_json_object_is_answered_202_with_a_new_payload_id(self, node: Node) -> None:
        """A valid write answers 202 {"payload_id": 32 lowercase hex, "status": "accepted"}."""
        result = node.post({"temperature": 21.5})

        assert result.status_code == 202
        assert set(result.json) == {"payload_id", "status"}
        assert result.json["status"] == "accepted"
        assert PAYLOAD_ID.fullmatch(result.json["payload_id"])
        assert result.headers["Content-Type"] == "application/json"

    def test_every_write_gets_its_own_payload_id(self, node: Node) -> None:
        """Two writes without an Idempotency-Key are two entries with different ids."""
        assert node.accepted({"n": 1}) != node.accepted({"n": 1})

    def test_an_accepted_entry_is_stored_in_nexus_entries(self, node: Node) -> None:
        """The row carries the payload_id, source, destination, subject, key and payload of the write."""
        payload = {"reading": [1, 2, 3], "unit": "°C", "nested": {"ok": True}}

        payload_id = node.accepted(payload, headers={"X-Subject": "sensor-7", "Idempotency-Key": "k-1"})
        node.wait_delivered([payload_id])

        [row] = node.rows()
        assert row["payload_id"] == payload_id
        assert row["source"] == "default"
        assert row["destination"] == "default"
        assert row["subject"] == "sensor-7"
        assert row["idempotency_key"] == "k-1"
        assert orjson.loads(row["payload"]) == payload

    def test_subject_and_key_are_null_when_not_sent(self, node: Node) -> None:
        """Without X-Subject and Idempotency-Key, the row's subject and idempotency_key are NULL."""
        payload_id = node.accepted({"n": 1})
        node.wait_delivered([payload_id])

        [row] = node.rows()
        assert row["subject"] is None
        assert row["idempotency_key"] is None


class TestContentType:
    """A Content-Type of application/json, or none (RFC 9110 section 15.5.16 for 415)."""

    @pytest.mark.parametrize(
        "content_type",
        [None, "application/json", "application/json; charset=utf-8", "Application/JSON"],
        ids=["absent", "json", "json-charset", "json-mixed-case"],
    )
    def test_json_or_no_content_type_is_accepted(self, node: Node, content_type: str | None) -> None:
        """No Content-Type, or application/json with or without parameters, is accepted."""
        result = node.post({"n": 1}, content_type=content_type)

        assert result.status_code == 202

    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
    def test_another_media_type_is_415(self, node: Node, content_type: str) -> None:
        """Any other media type answers 415 unsupported_media_type."""
        result = node.post({"n": 1}, content_type=content_type)

        assert_error(result, 415, "unsupported_media_type")


class TestBody:
    """400: the body must be one JSON object."""

    @pytest.mark.parametrize(
        "body", [b"{", b'{"a": }', b"{'a': 1}", b""], ids=["truncated", "no-value", "quotes", "empty"]
    )
    def test_malformed_json_is_400_invalid_json(self, node: Node, body: bytes) -> None:
        """A body that is not JSON at all answers 400 invalid_json."""
        assert_error(node.post(body=body), 400, "invalid_json")

    @pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
    def test_json_that_is_not_an_object_is_400_invalid_body(self, node: Node, body: bytes) -> None:
        """Valid JSON other than an object (array, string, number, null, boolean) answers 400 invalid_body."""
        assert_error(node.post(body=body), 400, "invalid_body")

    def test_invalid_utf8_is_400_invalid_json(self, node: Node) -> None:
        """A body that is not UTF-8 answers 400 invalid_json."""
        assert_error(node.post(body=b'{"name": "\xff\xfe"}'), 400, "invalid_json")

    def test_nesting_past_the_limit_is_400_and_nothing_is_stored(self, node: Node) -> None:
        """The 508-byte body nested 251 deep that once broke /query is refused with 400 invalid_body."""
        body = b'{"a":' + b"[" * 250 + b"]" * 250 + b"}"

        body_json = assert_error(node.post(body=body), 400, "invalid_body")

        assert body_json["details"] == {"max_nesting": MAX_NESTING}
        assert node.wal_pending == 0

    def test_nesting_at_the_limit_is_accepted(self, node: Node) -> None:
        """A body nested exactly MAX_NESTING levels deep is a normal write."""
        body = b'{"a":' + b"[" * (MAX_NESTING - 1) + b"]" * (MAX_NESTING - 1) + b"}"

        assert node.post(body=body).status_code == 202

    def test_a_refused_body_is_not_stored(self, node: Node) -> None:
        """A 400 write leaves nothing pending in the WAL."""
        node.post(body=b"[1]")

        assert node.wal_pending == 0


class TestBodySize:
    """413 payload_too_large (RFC 9110 section 15.5.14) past NEXUS_MAX_BODY_BYTES."""

    @pytest.fixture
    def small(self, harness: Harness) -> Node:
        return harness.start({"NEXUS_MAX_BODY_BYTES": str(SMALL_BODY_LIMIT)})

    @staticmethod
    def body_of(size: int) -> bytes:
        body = b'{"pad": "' + b"x" * (size - 11) + b'"}'
        assert len(body) == size
        return body

    # A chunked request, as gunicorn hands it to the app: no CONTENT_LENGTH, and
    # wsgi.input_terminated set because the server ends the input stream itself.
    CHUNKED: Mapping[str, object] = {"CONTENT_LENGTH": "", "wsgi.input_terminated": True}

    def test_a_body_of_exactly_the_limit_is_accepted(self, small: Node) -> None:
        """A body of exactly NEXUS_MAX_BODY_BYTES bytes is accepted."""
        assert small.post(body=self.body_of(SMALL_BODY_LIMIT)).status_code == 202

    def test_a_declared_content_length_over_the_limit_is_413(self, small: Node) -> None:
        """A Content-Length over the limit answers 413 payload_too_large, naming the limit."""
        result = small.post(body=self.body_of(SMALL_BODY_LIMIT + 1))

        body = assert_error(result, 413, "payload_too_large")
        assert body["details"] == {"max_body_bytes": SMALL_BODY_LIMIT}

    def test_a_chunked_body_over_the_limit_is_413(self, small: Node) -> None:
        """A body without Content-Length that runs past the limit answers 413."""
        result = small.post(
            body=self.body_of(SMALL_BODY_LIMIT * 4), headers={"Transfer-Encoding": "chunked"}, extras=self.CHUNKED
        )

        assert_error(result, 413, "payload_too_large")

    def test_a_chunked_body_within_the_limit_is_accepted_and_stored(self, small: Node) -> None:
        """A body without Content-Length is read to its end and stored, not taken as empty."""
        result = small.post(body=b'{"chunked": true}', headers={"Transfer-Encoding": "chunked"}, extras=self.CHUNKED)

        assert result.status_code == 202, result.text
        small.wait_delivered([result.json["payload_id"]])
        assert orjson.loads(small.rows()[0]["payload"]) == {"chunked": True}

    def test_a_body_shorter_than_its_content_length_is_400_and_stores_nothing(self, small: Node) -> None:
        """A body that ends before its declared Content-Length (the client stopped) is 400, not stored."""
        body = b'{"n": 1}'
        result = small.post(body=body, extras={"CONTENT_LENGTH": str(len(body) + 10)})

        error = assert_error(result, 400, "invalid_body")
        assert error["details"] == {"content_length": len(body) + 10, "received": len(body)}
        assert small.rows() == []


class TestAuthentication:
    """401 without a known token, 403 for the wrong one, 404 only after authentication."""

    @pytest.mark.parametrize(
        "authorization",
        [None, f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN, "Bearer ", "Bearer not-a-known-token"],
        ids=["missing", "basic-scheme", "other-scheme", "no-scheme", "empty-token", "unknown-token"],
    )
    def test_no_known_bearer_token_is_401(self, node: Node, authorization: str | None) -> None:
        """A missing header, another scheme, an empty or an unknown token answer 401 unauthorized."""
        headers = {} if authorization is None else {"Authorization": authorization}

        result = node.post({"n": 1}, token=None, headers=headers)

        assert_error(result, 401, "unauthorized")

    def test_the_bearer_scheme_is_case_insensitive(self, node: Node) -> None:
        """`bearer <token>` is as good as `Bearer <token>` (RFC 9110 section 11.1)."""
        assert node.post({"n": 1}, token=None, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 202

    def test_another_sources_token_is_403(self, two_sources: Node) -> None:
        """The token of source `other` cannot write to `default`: 403 source_mismatch."""
        result = two_sources.post({"n": 1}, source="default", token=OTHER_TOKEN)

        assert_error(result, 403, "source_mismatch")

    def test_each_source_writes_with_its_own_token(self, two_sources: Node) -> None:
        """Each source's own token writes to it, and the row names that source."""
        payload_id = two_sources.accepted({"n": 1}, source="other", token=OTHER_TOKEN)
        two_sources.wait_delivered([payload_id])

        assert [row["source"] for row in two_sources.rows()] == ["other"]

    def test_the_admin_token_is_403(self, node: Node) -> None:
        """The admin token cannot write entries: 403 source_mismatch."""
        assert_error(node.post({"n": 1}, token=ADMIN_TOKEN), 403, "source_mismatch")

    def test_an_unknown_source_is_404_for_an_authenticated_caller(self, node: Node) -> None:
        """With a valid token, a source that does not exist answers 404 unknown_source."""
        assert_error(node.post({"n": 1}, source="nowhere"), 404, "unknown_source")

    def test_an_unknown_source_is_401_without_a_valid_token(self, node: Node) -> None:
        """Without a valid token, an unknown source answers exactly as a known one: source names do not leak."""
        unknown = node.post({"n": 1}, source="nowhere", token="guess")
        known = node.post({"n": 1}, source="default", token="guess")

        assert_error(unknown, 401, "unauthorized")
        assert unknown.json == known.json


class TestIdempotency:
    """Idempotency-Key: one entry per (source, key), across retries, races and restarts."""

    def test_a_repeated_key_is_200_duplicate_with_the_original_id(self, node: Node) -> None:
        """A second write with the same key answers 200 {"payload_id": the original, "status": "duplicate"}."""
        original = node.accepted({"n": 1}, headers={"Idempotency-Key": "order-42"})

        again = node.post({"n": 1}, headers={"Idempotency-Key": "order-42"})

        assert again.status_code == 200
        assert again.json == {"payload_id": original, "status": "duplicate"}

    def test_a_repeated_key_stores_one_row(self, node: Node) -> None:
        """However often a key is sent, exactly one row is delivered."""
        original = node.accepted({"n": 1}, headers={"Idempotency-Key": "order-42"})
        for _ in range(3):
            assert node.post({"n": 1}, headers={"Idempotency-Key": "order-42"}).status_code == 200

        node.wait_delivered([original])
        node.wait_settled()

        assert node.delivered_ids() == [original]

    def test_the_same_key_from_another_source_is_independent(self, two_sources: Node) -> None:
        """Keys are per source: the same key from two sources makes two entries."""
        first = two_sources.accepted({"n": 1}, source="default", headers={"Idempotency-Key": "shared"})
        second = two_sources.accepted(
            {"n": 1}, source="other", token=OTHER_TOKEN, headers={"Idempotency-Key": "shared"}
        )

        two_sources.wait_delivered([first, second])
        assert first != second
        assert sorted(row["source"] for row in two_sources.rows()) == ["default", "other"]

    def test_a_key_of_255_visible_characters_is_accepted(self, node: Node) -> None:
        """The longest key the contract allows, 255 visible ASCII characters, is accepted."""
        key = "!~" * 127 + "k"

        assert node.post({"n": 1}, headers={"Idempotency-Key": key}).status_code == 202

    @pytest.mark.parametrize(
        "key",
        ["k" * 256, "has space", "tab\there", "caf\u00e9", ""],
        ids=["too-long", "space", "control", "non-ascii", "empty"],
    )
    def test_a_malformed_key_is_400(self, node: Node, key: str) -> None:
        """A key longer than 255, with characters other than visible ASCII, or empty, answers 400."""
        result = node.post({"n": 1}, headers={"Idempotency-Key": key})

        assert_error(result, 400, "invalid_idempotency_key")
        assert node.wal_pending == 0

    def test_two_key_headers_are_400_and_nothing_is_stored(self, node: Node) -> None:
        """Two Idempotency-Key headers (joined "k1,k2" by the server) answer 400, not a write under a made-up key."""
        headers = [*bearer(TOKEN).items(), ("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
        result = node.client.simulate_post("/inbound/default", body=b'{"n": 1}', headers=headers)

        assert_error(result, 400, "invalid_idempotency_key")
        assert node.wal_pending == 0

    def test_concurrent_writes_with_one_key_make_one_entry(self, node: Node) -> None:
        """Two requests racing with the same key get the same payload_id, and one row is stored."""
        # Given two greenlets sending the same key at once (each yields inside the write path)
        racers = [gevent.spawn(node.post, {"n": i}, headers={"Idempotency-Key": "race"}) for i in range(2)]
        # When both are answered
        results = [racer.get(timeout=5) for racer in racers]

        # Then one was accepted, the other is its duplicate, and one row is stored
        assert sorted(r.status_code for r in results) == [200, 202]
        [payload_id] = {r.json["payload_id"] for r in results}
        node.wait_delivered([payload_id])
        node.wait_settled()
        assert node.delivered_ids() == [payload_id]

    def test_a_key_is_remembered_across_a_restart(self, harness: Harness) -> None:
        """After the service restarts on the same data dir, the key still answers 200 with the original id."""
        # Given a key accepted and delivered by one service, which then shuts down
        first = harness.start()
        original = first.accepted({"n": 1}, headers={"Idempotency-Key": "survives"})
        first.wait_delivered([original])
        assert first.service.shutdown(5)

        # When the same key reaches a new service on the same data directory
        second = harness.start()
        again = second.post({"n": 1}, headers={"Idempotency-Key": "survives"})

        # Then it is a duplicate of the original, and still one row is stored
        assert again.status_code == 200
        assert again.json == {"payload_id": original, "status": "duplicate"}
        second.wait_settled()
        assert second.delivered_ids() == [original]

    def test_expired_keys_are_pruned_at_start(self, harness: Harness) -> None:
        """Keys older than the window are gone from the index after a restart, and the key can be used again."""
        # Given keys accepted under a short window by a service that then stops
        window = 0.5
        first = harness.start({"NEXUS_IDEMPOTENCY_WINDOW": str(window)})
        for n in range(20):
            first.accepted({"n": n}, headers={"Idempotency-Key": f"old-{n}"})
        written = time.time()
        assert first.service.shutdown(5)
        assert idempotency_keys(harness.data_dir) == 20
        wait_until(lambda: time.time() > written + window, what="the window to pass")

        # When a service starts on the same data directory
        second = harness.start({"NEXUS_IDEMPOTENCY_WINDOW": str(window)})

        # Then the expired keys are pruned without any request
        wait_until(lambda: idempotency_keys(harness.data_dir) == 0, what="the expired keys pruned")
        assert second.post({"n": 0}, headers={"Idempotency-Key": "old-0"}).status_code == 202

    def test_expired_keys_are_pruned_while_running(self, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        """A running service forgets keys once they are older than the window, off the request path."""
        monkeypatch.setattr(service_module, "PRUNE_INTERVAL", 0.05)
        node = harness.start({"NEXUS_IDEMPOTENCY_WINDOW": "0.3"})
        for n in range(10):
            node.accepted({"n": n}, headers={"Idempotency-Key": f"k-{n}"})

        wait_until(lambda: idempotency_keys(harness.data_dir) == 0, what="the keys pruned while running")

    def test_a_malformed_subject_is_400(self, node: Node) -> None:
        """An X-Subject longer than 255 or with characters other than visible ASCII answers 400 invalid_subject."""
        assert_error(node.post({"n": 1}, headers={"X-Subject": "s" * 256}), 400, "invalid_subject")


class TestLoadSheddingDurable:
    """429 queue_full under the durable policy (RFC 6585): the entry is in the WAL and will be delivered."""

    def test_a_full_queue_answers_429_with_retry_after_and_the_payload_id(
        self, durable_blocked: tuple[Node, WriteLock]
    ) -> None:
        """429 queue_full carries Retry-After (whole seconds >= 1), the same retry_after_seconds, and the payload_id."""
        node, _lock = durable_blocked
        fill_queue(node)

        result = node.post({"shed": 1})

        body = assert_error(result, 429, "queue_full", extra=frozenset({"payload_id"}))
        assert PAYLOAD_ID.fullmatch(body["payload_id"])
        assert body["details"]["payload_id"] == body["payload_id"]

    def test_a_shed_entry_is_durable_before_the_429(self, durable_blocked: tuple[Node, WriteLock]) -> None:
        """The payload_id of a 429 is already pending in the WAL when the client reads it."""
        node, _lock = durable_blocked
        fill_queue(node)

        payload_id = node.post({"shed": 1}).json["payload_id"]

        assert node.service.wal is not None
        assert node.service.wal.is_pending(payload_id)

    def test_shed_entries_are_delivered_once_there_is_room_without_a_restart(
        self, durable_blocked: tuple[Node, WriteLock]
    ) -> None:
        """Every 202 and every 429 payload_id reaches nexus_entries exactly once, while the service keeps running."""
        # Given a queue that is full while the destination is locked
        node, lock = durable_blocked
        accepted = fill_queue(node)
        shed = []
        for i in range(3):
            result = node.post({"shed": i})
            assert result.status_code == 429
            shed.append(result.json["payload_id"])

        # When the destination can take writes again
        lock.release()

        # Then everything acknowledged is delivered, once, by this same service
        node.wait_delivered(accepted + shed)
        node.wait_settled()
        delivered = node.delivered_ids()
        assert sorted(delivered) == sorted(accepted + shed)
        assert len(delivered) == len(set(delivered))

    def test_retry_after_grows_with_the_backlog(self, durable_blocked: tuple[Node, WriteLock]) -> None:
        """Each further 429 while nothing is delivered advises a Retry-After at least as long as the last."""
        node, _lock = durable_blocked
        fill_queue(node)

        advised = [int(node.post({"shed": i}).headers["Retry-After"]) for i in range(4)]

        assert advised == sorted(advised)
        assert advised[-1] > advised[0]

    def test_retrying_a_shed_write_with_its_key_is_a_duplicate(self, durable_blocked: tuple[Node, WriteLock]) -> None:
        """A client retrying a durable 429 with the same Idempotency-Key gets 200 duplicate, not a second entry."""
        node, _lock = durable_blocked
        fill_queue(node)
        shed = node.post({"shed": 1}, headers={"Idempotency-Key": "retry-me"})
        assert shed.status_code == 429

        retry = node.post({"shed": 1}, headers={"Idempotency-Key": "retry-me"})

        assert retry.status_code == 200
        assert retry.json == {"payload_id": shed.json["payload_id"], "status": "duplicate"}


class TestLoadSheddingReject:
    """429 queue_full under NEXUS_SHED_POLICY=reject: nothing is stored."""

    def test_a_full_queue_answers_429_without_a_payload_id(self, reject_blocked: tuple[Node, WriteLock]) -> None:
        """The 429 carries Retry-After and retry_after_seconds but no payload_id."""
        node, _lock = reject_blocked
        fill_queue(node)

        result = node.post({"rejected": 1})

        body = assert_error(result, 429, "queue_full")
        assert "payload_id" not in body["details"]
        assert "Retry-After" in result.headers

    def test_a_rejected_write_adds_nothing_to_the_wal(self, reject_blocked: tuple[Node, WriteLock]) -> None:
        """The WAL's pending count is the same before and after a rejected write."""
        node, _lock = reject_blocked
        fill_queue(node)
        before = node.wal_pending

        assert node.post({"rejected": 1}).status_code == 429

        assert node.wal_pending == before

    def test_a_rejected_write_never_reaches_the_destination(self, reject_blocked: tuple[Node, WriteLock]) -> None:
        """Once the destination is back, only the accepted writes are stored, not the rejected one."""
        # Given a rejected write marked with a unique value
        node, lock = reject_blocked
        accepted = fill_queue(node)
        marker = uuid.uuid4().hex
        assert node.post({"marker": marker}).status_code == 429

        # When the destination can take writes again and the accepted ones are delivered
        lock.release()
        node.wait_delivered(accepted)
        node.wait_settled()

        # Then the rejected write is nowhere
        rows = node.rows()
        assert sorted(row["payload_id"] for row in rows) == sorted(accepted)
        assert all(marker not in row["payload"] for row in rows)

    def test_a_rejected_key_is_not_claimed(self, reject_blocked: tuple[Node, WriteLock]) -> None:
        """A write rejected with an Idempotency-Key can be retried with it later and is accepted then."""
        node, lock = reject_blocked
        fill_queue(node)
        assert node.post({"n": 1}, headers={"Idempotency-Key": "later"}).status_code == 429

        lock.release()
        wait_until(lambda: node.backlog.room > 0 and node.backlog.waiting == 0, what="room in the queue")

        assert node.post({"n": 1}, headers={"Idempotency-Key": "later"}).status_code == 202


class TestRetryAfter:
    """Backlog.retry_after: derived from the backlog and the measured delivery rate, not a constant."""

    @pytest.fixture
    def backlog(self) -> Iterator[Backlog]:
        # One slot and nothing delivering until the test yields: offers stay where they land.
        destination = RecordingDestination()
        queue = Queue(QueueConfig(size=1, workers=1), RecordingLogger(), destination, RecordingUpdater())
        backlog = Backlog(queue, RecordingLogger())
        yield backlog
        backlog.stop()
        assert queue.drain(5)

    def test_an_empty_backlog_advises_the_minimum(self, backlog: Backlog) -> None:
        """With nothing waiting, Retry-After is the minimum of one second."""
        assert backlog.retry_after() == RETRY_AFTER_MIN

    def test_a_longer_backlog_advises_a_longer_wait(self, backlog: Backlog) -> None:
        """More entries waiting means a Retry-After at least as long, and longer once it counts in seconds."""
        for _ in range(3):
            backlog.offer(make_entry(destination=backlog.name))
        shorter = backlog.retry_after()
        for _ in range(10):
            backlog.offer(make_entry(destination=backlog.name))

        assert backlog.retry_after() > shorter

    def test_a_faster_measured_rate_advises_a_shorter_wait(self, backlog: Backlog) -> None:
        """The same backlog advises a shorter Retry-After once more deliveries per second are measured."""
        for _ in range(20):
            backlog.offer(make_entry(destination=backlog.name))
        slow = backlog.retry_after()

        backlog.meter.tick(100)

        assert backlog.retry_after() < slow


class TestWalUnavailable:
    """503 wal_unavailable when the WAL cannot make an entry durable; the service recovers by itself."""

    def test_a_failing_fsync_is_503_and_nothing_is_acknowledged(
        self, node: Node, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the disk full, a write answers 503 wal_unavailable and leaves nothing pending in the WAL."""
        monkeypatch.setattr(os, "write", failing_wal_write)

        result = node.post({"n": 1})

        body = assert_error(result, 503, "wal_unavailable")
        assert "payload_id" not in body["details"]
        assert node.wal_pending == 0

    def test_writes_succeed_again_once_the_disk_recovers(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        """After the cause is gone the next write is 202 without a restart, and only it is stored."""
        # Given a write refused while the disk was full
        marker = uuid.uuid4().hex
        monkeypatch.setattr(os, "write", failing_wal_write)
        assert node.post({"marker": marker}).status_code == 503

        # When the disk recovers
        monkeypatch.undo()
        payload_id = node.accepted({"n": 2})

        # Then the new write is delivered, and the refused one never is
        node.wait_delivered([payload_id])
        node.wait_settled()
        rows = node.rows()
        assert [row["payload_id"] for row in rows] == [payload_id]
        assert marker not in rows[0]["payload"]

    def test_ready_reports_wal_unwritable_until_a_write_succeeds(
        self, node: Node, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """/ready answers 503 with reason wal_unwritable after a failed WAL write, and 200 after a good one."""
        monkeypatch.setattr(os, "write", failing_wal_write)
        node.post({"n": 1})

        failing = node.client.simulate_get("/ready")
        assert failing.status_code == 503
        assert "wal_unwritable" in failing.json["details"]["reasons"]

        monkeypatch.undo()
        node.accepted({"n": 2})
        assert node.client.simulate_get("/ready").status_code == 200

    def test_a_key_refused_by_the_wal_is_not_used_up(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write refused with 503 can be retried with the same Idempotency-Key and is accepted, not a duplicate."""
        monkeypatch.setattr(os, "write", failing_wal_write)
        assert node.post({"n": 1}, headers={"Idempotency-Key": "k"}).status_code == 503

        monkeypatch.undo()

        assert node.post({"n": 1}, headers={"Idempotency-Key": "k"}).status_code == 202


class TestShuttingDown:
    """503 shutting_down while the worker drains."""

    def test_a_draining_service_answers_503_shutting_down(self, node: Node) -> None:
        """Once the service is draining, a write answers 503 shutting_down with a Retry-After."""
        node.service.state = WorkerState.DRAINING

        result = node.post({"n": 1})

        assert_error(result, 503, "shutting_down")
        assert "Retry-After" in result.headers
        assert node.wal_pending == 0

    def test_begin_shutdown_refuses_writes_at_once(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        """lifecycle.begin_shutdown (the signal handler's call) makes the next write answer 503 shutting_down."""
        monkeypatch.setattr(lifecycle, "_service", node.service)

        lifecycle.begin_shutdown()

        assert_error(node.post({"n": 1}), 503, "shutting_down")


class TestProbes:
    """GET /health (liveness) and GET /ready (readiness)."""

    def test_health_is_200(self, node: Node) -> None:
        """/health answers 200 while the process can serve."""
        result = node.client.simulate_get("/health")

        assert result.status_code == 200
        assert result.json == {"status": "ok"}

    def test_health_stays_200_while_draining(self, node: Node) -> None:
        """/health is liveness only: a draining worker is still alive."""
        node.service.state = WorkerState.DRAINING

        assert node.client.simulate_get("/health").status_code == 200

    def test_ready_is_200_when_ready(self, node: Node) -> None:
        """/ready answers 200 once replay is done and nothing is wrong."""
        result = node.client.simulate_get("/ready")

        assert result.status_code == 200
        assert result.json == {"status": "ready"}

    def test_ready_is_503_while_replaying(self, harness: Harness) -> None:
        """/ready answers 503 with reason replaying until the WAL replay has finished."""
        # Given a started service whose replay greenlet has not run yet (nothing has yielded)
        node = harness.start(ready=False)

        replaying = node.client.simulate_get("/ready")

        assert_error(replaying, 503, "not_ready")
        assert replaying.json["details"]["reasons"] == ["replaying"]
        # And once replay is done it is ready
        assert node.service.wait_ready(5)
        assert node.client.simulate_get("/ready").status_code == 200

    def test_ready_is_503_while_draining(self, node: Node) -> None:
        """/ready answers 503 with reason draining once the worker drains."""
        node.service.state = WorkerState.DRAINING

        result = node.client.simulate_get("/ready")

        assert_error(result, 503, "not_ready")
        assert result.json["details"]["reasons"] == ["draining"]


def _drain(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.service.state = WorkerState.DRAINING


def _fail_fsync(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", failing_wal_write)


def _crash_write_path(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug, with internal detail")

    monkeypatch.setattr(node.service.ingest, "write", crash)


def _nothing(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    pass


Arrange = Callable[[Node, pytest.MonkeyPatch], None]
AUTH = bearer()
INBOUND = "/inbound/default"


@dataclass(frozen=True)
class ErrorCase:
    """One request that fails, and the status and code it must answer."""

    status: int
    code: str
    method: str = "POST"
    path: str = INBOUND
    headers: Mapping[str, str] = field(default_factory=lambda: AUTH)
    body: bytes = b"{}"
    arrange: Arrange = _nothing


# One per error the API answers. The two 429s have their own tests above, which
# check the same shape with the same assert_error.
ERROR_CASES = {
    "invalid_json": ErrorCase(400, "invalid_json", body=b"{"),
    "invalid_body": ErrorCase(400, "invalid_body", body=b"[]"),
    "invalid_idempotency_key": ErrorCase(400, "invalid_idempotency_key", headers={**AUTH, "Idempotency-Key": "a b"}),
    "invalid_subject": ErrorCase(400, "invalid_subject", headers={**AUTH, "X-Subject": "a\tb"}),
    "unauthorized": ErrorCase(401, "unauthorized", headers={}),
    "source_mismatch": ErrorCase(403, "source_mismatch", headers=bearer(ADMIN_TOKEN)),
    "unknown_source": ErrorCase(404, "unknown_source", path="/inbound/nowhere"),
    "route_not_found": ErrorCase(404, "not_found", method="GET", path="/nowhere", body=b""),
    "method_not_allowed": ErrorCase(405, "method_not_allowed", method="GET", body=b""),
    "payload_too_large": ErrorCase(413, "payload_too_large", body=b'{"pad": "' + b"x" * SMALL_BODY_LIMIT + b'"}'),
    "unsupported_media_type": ErrorCase(415, "unsupported_media_type", headers={**AUTH, "Content-Type": "text/plain"}),
    "internal_error": ErrorCase(500, "internal_error", arrange=_crash_write_path),
    "wal_unavailable": ErrorCase(503, "wal_unavailable", arrange=_fail_fsync),
    "shutting_down": ErrorCase(503, "shutting_down", arrange=_drain),
    "not_ready": ErrorCase(503, "not_ready", method="GET", path="/ready", headers={}, body=b"", arrange=_drain),
}


class TestErrorShape:
    """Every error body is {"error", "message", "details"}, plus retry_after_seconds with a Retry-After."""

    @pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
    def test_every_error_has_the_contract_shape(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch, case: ErrorCase
    ) -> None:
        """Each error answers its status with exactly the contract's keys and its snake_case code."""
        node = harness.start({"NEXUS_MAX_BODY_BYTES": str(SMALL_BODY_LIMIT)})
        case.arrange(node, monkeypatch)

        result = node.client.simulate_request(case.method, case.path, headers=dict(case.headers), body=case.body)

        assert_error(result, case.status, case.code)

    def test_an_unexpected_error_hides_its_detail_from_the_client(
        self, node: Node, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug answers 500 internal_error without the exception's text."""
        _crash_write_path(node, monkeypatch)

        result = node.post({"n": 1})

        assert_error(result, 500, "internal_error")
        assert "internal detail" not in result.text

    def test_an_unexpected_error_is_logged_with_its_traceback(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch, captured_logs: io.StringIO
    ) -> None:
        """A bug's traceback goes to the log at error level, so a 500 can be diagnosed."""
        node = harness.start(logger=get_logger("nexus_gevent"))
        _crash_write_path(node, monkeypatch)

        node.post({"n": 1})

        lines = [orjson.loads(line) for line in captured_logs.getvalue().splitlines()]
        [failure] = [line for line in lines if line.get("event") == "request_failed"]
        assert failure["level"] == "error"
        assert failure["path"] == "/inbound/default"
        assert "RuntimeError: a bug, with internal detail" in failure["exception"]

    def test_method_not_allowed_names_the_allowed_methods(self, node: Node) -> None:
        """A 405 carries an Allow header (RFC 9110 section 15.5.6)."""
        result = node.client.simulate_get("/inbound/default", headers=AUTH)

        assert "POST" in result.headers["Allow"]


class TestRequestId:
    """X-Request-Id: echoed when the client sends a usable one, generated otherwise."""

    def test_a_given_request_id_is_echoed(self, node: Node) -> None:
        """A client's X-Request-Id comes back unchanged."""
        result = node.post({"n": 1}, headers={"X-Request-Id": "client-req-0001"})

        assert result.headers["X-Request-Id"] == "client-req-0001"

    def test_a_request_id_is_generated_when_absent(self, node: Node) -> None:
        """Without X-Request-Id, the answer carries a fresh one of 32 hex digits."""
        first = node.post({"n": 1}).headers["X-Request-Id"]
        second = node.post({"n": 1}).headers["X-Request-Id"]

        assert re.fullmatch(r"[0-9a-f]{32}", first)
        assert first != second

    def test_an_unsafe_request_id_is_replaced(self, node: Node) -> None:
        """A request id that could forge a log line (spaces, quotes, too long) is replaced by a generated one."""
        result = node.post({"n": 1}, headers={"X-Request-Id": 'evil" injected=1'})

        assert re.fullmatch(r"[0-9a-f]{32}", result.headers["X-Request-Id"])

    def test_error_responses_carry_the_request_id(self, node: Node) -> None:
        """Errors, even for unknown routes, echo the request id."""
        result = node.client.simulate_get("/nowhere", headers={"X-Request-Id": "trace-404"})

        assert result.status_code == 404
        assert result.headers["X-Request-Id"] == "trace-404"


class TestLogging:
    """One log line per request; never a token, never a body."""

    def test_logs_carry_the_request_line_but_no_token_or_body(
        self, harness: Harness, captured_logs: io.StringIO
    ) -> None:
        """The request line is logged; the bearer token, a wrong token and the body's text never are."""
        # Given a service logging JSON lines into a buffer
        node = harness.start(logger=get_logger("nexus_gevent"))
        marker = f"body-marker-{uuid.uuid4().hex}"
        wrong_token = f"wrong-token-{uuid.uuid4().hex}"

        # When writes succeed and fail with the marker in their bodies
        payload_id = node.accepted({"secret_note": marker})
        node.post({"note": marker}, token=wrong_token)
        node.post(body=f'{{"note": "{marker}"'.encode())
        node.wait_delivered([payload_id])

        # Then the request lines are there, and neither the tokens nor the bodies
        output = captured_logs.getvalue()
        lines = [orjson.loads(line) for line in output.splitlines()]
        requests = [line for line in lines if line.get("event") == "request"]
        assert [(r["path"], r["status"]) for r in requests] == [
            ("/inbound/default", 202),
            ("/inbound/default", 401),
            ("/inbound/default", 400),
        ]
        assert requests[0]["payload_id"] == payload_id
        assert TOKEN not in output
        assert wrong_token not in output
        assert marker not in output


READER_TOKEN = "reader-token-7e0c41"
#: `default` and `other` write to one destination; `reader` may read `default` too.
READERS_TOML = (
    TWO_SOURCES_TOML
    + f"""
[[sources]]
name = "reader"
token = "{READER_TOKEN}"
destination = "default"
can_read = ["default"]
"""
)


@pytest.fixture
def readers(harness: Harness) -> Node:
    return harness.start({"NEXUS_CONFIG": harness.config_file(READERS_TOML)})


def query(node: Node, token: str, params: str = "") -> falcon.testing.Result:
    return node.client.simulate_get("/query/default", query_string=params, headers=bearer(token))


class TestQueryScope:
    """A source's token reads its own records (and those its can_read names); the admin's reads all."""

    def test_a_source_reads_only_its_own_records(self, readers: Node) -> None:
        """Two sources in one destination: each token's /query holds its own records and none of the other's."""
        mine = readers.accepted({"n": 1})
        theirs = readers.accepted({"n": 2}, token=OTHER_TOKEN, source="other")
        readers.wait_delivered([mine, theirs])

        assert [r["payload_id"] for r in query(readers, TOKEN).json["records"]] == [mine]
        assert [r["payload_id"] for r in query(readers, OTHER_TOKEN).json["records"]] == [theirs]

    def test_naming_a_source_the_token_may_not_read_is_403(self, readers: Node) -> None:
        """?source=other with default's token answers 403 source_forbidden, not an empty page."""
        result = query(readers, TOKEN, "source=other")

        body = assert_error(result, 403, "source_forbidden")
        assert body["details"] == {"readable_sources": ["default"]}

    def test_can_read_adds_another_sources_records(self, readers: Node) -> None:
        """`reader` (can_read = ["default"]) reads its own and default's records, and not other's."""
        own = readers.accepted({"n": 1}, token=READER_TOKEN, source="reader")
        granted = readers.accepted({"n": 2})
        hidden = readers.accepted({"n": 3}, token=OTHER_TOKEN, source="other")
        readers.wait_delivered([own, granted, hidden])

        assert {r["payload_id"] for r in query(readers, READER_TOKEN).json["records"]} == {own, granted}
        assert [r["payload_id"] for r in query(readers, READER_TOKEN, "source=default").json["records"]] == [granted]

    def test_the_admin_reads_every_source(self, readers: Node) -> None:
        """The admin token's /query holds every source's records, and ?source= narrows them."""
        ids = [readers.accepted({"n": 1}), readers.accepted({"n": 2}, token=OTHER_TOKEN, source="other")]
        readers.wait_delivered(ids)

        assert {r["payload_id"] for r in query(readers, ADMIN_TOKEN).json["records"]} == set(ids)
        assert [r["payload_id"] for r in query(readers, ADMIN_TOKEN, "source=other").json["records"]] == ids[1:]


class TestQueryPayloads:
    """/query hands back each payload's JSON text as stored, never decoded and encoded again."""

    def test_big_numbers_come_back_with_every_digit(self, node: Node) -> None:
        """Integers past 64 bits are read back exactly, not as floats."""
        payload_id = node.accepted(body=b'{"id":18446744073709551617,"x":12345678901234567890123}')
        node.wait_delivered([payload_id])

        text = query(node, TOKEN).text

        assert "18446744073709551617" in text
        assert "12345678901234567890123" in text
        assert "e+" not in text

    def test_a_stored_payload_nested_deeper_than_the_encoder_allows_is_read_back(self, node: Node) -> None:
        """A row nested 300 deep (stored before ingest refused such depth) is served, not a 500 for its page."""
        deep = b'{"a":' + b"[" * 299 + b"]" * 299 + b"}"
        node.service.destinations["default"].write([make_entry(payload=deep)])
        healthy = node.accepted({"n": 1})
        node.wait_delivered([healthy])

        result = query(node, ADMIN_TOKEN)

        assert result.status_code == 200, result.text
        assert b'"payload":' + deep in result.content


class TestQueryPageBudget:
    """A /query page is cut by a byte budget as well as by limit; the cursor goes on from there."""

    RECORD_BYTES = 300_000
    BUDGET = 1_000_000

    def write_big(self, node: Node, count: int) -> list[str]:
        ids = [node.accepted(body=b'{"pad":"' + bytes([97 + i % 26]) * self.RECORD_BYTES + b'"}') for i in range(count)]
        node.wait_delivered(ids)
        return ids

    def test_pages_hold_at_most_the_budget_and_paging_returns_every_record_once(self, harness: Harness) -> None:
        """20 records of 300 kB with a 1 MB budget: pages of 3, each under the budget, every record once in order."""
        node = harness.start({"NEXUS_QUERY_PAGE_BYTES": str(self.BUDGET)})
        ids = self.write_big(node, 20)
        seen: list[str] = []
        params = "limit=1000"
        while True:
            result = query(node, TOKEN, params)
            assert result.status_code == 200, result.text[:200]
            records = result.json["records"]
            assert 1 <= len(records) <= self.BUDGET // self.RECORD_BYTES
            seen.extend(r["payload_id"] for r in records)
            if result.json["next"] is None:
                break
            params = f"limit=1000&after={result.json['next']}"
        assert seen == ids

    def test_a_record_larger_than_the_budget_is_a_page_of_its_own(self, harness: Harness) -> None:
        """With a budget smaller than one record, each page holds exactly one record."""
        node = harness.start({"NEXUS_QUERY_PAGE_BYTES": "1000"})
        ids = self.write_big(node, 2)

        first = query(node, TOKEN, "limit=1000")

        assert [r["payload_id"] for r in first.json["records"]] == ids[:1]
        assert first.json["next"] is not None

    def test_answering_a_page_costs_about_the_page_not_every_record(self, harness: Harness) -> None:
        """Python's peak memory answering one page stays within a few budgets although the records hold 6 MB."""
        node = harness.start({"NEXUS_QUERY_PAGE_BYTES": str(self.BUDGET)})
        self.write_big(node, 20)
        tracemalloc.start()
        try:
            result = query(node, TOKEN, "limit=1000")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.status_code == 200
        assert peak < 4 * self.BUDGET, f"peak {peak} bytes"
