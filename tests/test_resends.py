"""Retries that never duplicate: a key from the body, and resends after a durable 429 recognised.

In-process tests run the Falcon app on a real service (tests/test_http.py's Harness and
Node); a full queue is made by holding SQLite's write lock on the destination. The last
classes run real gunicorn with two workers: a resend that reaches the other worker, and a
stock urllib3 `Retry` that resends on 429 without any key.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import http.client
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import urllib3
from urllib3.util.retry import Retry

from nexus_gevent import datadir, resend_window
from nexus_gevent import service as service_module
from nexus_gevent.config import load_settings
from nexus_gevent.errors import ConfigError
from nexus_gevent.logs import get_logger
from nexus_gevent.testing import make_entry, wait_until
from nexus_gevent.wal import Wal
from tests.support.proc import (
    HOST,
    Gunicorn,
    Launcher,
    admin_headers,
    destination_locked,
    metric_sum,
    post_headers,
    ready,
    scrape,
    stored_markers,
    wait_for,
)
from tests.test_http import (
    OTHER_TOKEN,
    PAYLOAD_ID,
    Harness,
    Node,
    assert_error,
    fill_queue,
    start_blocked,
)

KEY_FIELD = {"NEXUS_IDEMPOTENCY_KEY_FIELD": "id"}
NDJSON = {"Content-Type": "application/x-ndjson"}

# Two sources on one destination: `default` keys its entries by "id", `other` has no key field.
KEYED_SOURCES_TOML = f"""
[[sources]]
name = "default"
idempotency_key_field = "id"

[[sources]]
name = "other"
token = "{OTHER_TOKEN}"
"""


@pytest.fixture
def keyed(harness: Harness) -> Node:
    return harness.start(KEY_FIELD)


@pytest.fixture
def shedding(harness: Harness, request: pytest.FixtureRequest) -> Node:
    """A durable node whose queue is full: the next write is shed (429, stored)."""
    node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable"})
    fill_queue(node)
    return node


def payloads(node: Node) -> list[Any]:
    """Every stored payload, parsed, oldest first."""
    return [orjson.loads(row["payload"]) for row in node.rows()]


def shed_id(node: Node, body: bytes, **kwargs: Any) -> str:
    """POST `body`, check it is a durable 429, and return its payload_id."""
    result = node.post(body=body, **kwargs)
    answer = assert_error(result, 429, "queue_full", extra=frozenset({"payload_id"}))
    assert answer["details"]["durable"] is True
    payload_id: str = answer["payload_id"]
    return payload_id


def expire_shed_bodies(data_dir: Path) -> None:
    """Move every remembered shed body past its expiry, as if the window had passed."""
    conn = sqlite3.connect(data_dir / resend_window.DB_FILENAME, isolation_level=None)
    try:
        conn.execute("UPDATE shed_bodies SET expires_at = 0")
    finally:
        conn.close()


def shed_bodies(data_dir: Path) -> int:
    conn = sqlite3.connect(data_dir / resend_window.DB_FILENAME)
    try:
        return int(conn.execute("SELECT count(*) FROM shed_bodies").fetchone()[0])
    finally:
        conn.close()


class TestKeyFieldSettings:
    """idempotency_key_field per [[sources]] table, NEXUS_IDEMPOTENCY_KEY_FIELD for `default`; the window's setting."""

    def test_the_variable_names_the_default_sources_key_field(self, tmp_path: Path) -> None:
        """NEXUS_IDEMPOTENCY_KEY_FIELD sets the key field of the implicit source `default`."""
        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), **KEY_FIELD})

        assert settings.sources[0].idempotency_key_field == "id"

    def test_each_source_table_has_its_own_key_field(self, tmp_path: Path) -> None:
        """A [[sources]] table's idempotency_key_field is that source's alone; a source without one has none."""
        config = tmp_path / "nexus.toml"
        config.write_text(KEYED_SOURCES_TOML)

        settings = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_CONFIG": str(config)})

        fields = {s.name: s.idempotency_key_field for s in settings.sources}
        assert fields == {"default": "id", "other": None}

    def test_the_variable_without_a_default_source_is_refused(self, tmp_path: Path) -> None:
        """NEXUS_IDEMPOTENCY_KEY_FIELD when [[sources]] declare no `default` is a ConfigError, not ignored."""
        config = tmp_path / "nexus.toml"
        config.write_text('[[sources]]\nname = "billing"\n')

        with pytest.raises(ConfigError, match="NEXUS_IDEMPOTENCY_KEY_FIELD"):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_CONFIG": str(config), **KEY_FIELD})

    @pytest.mark.parametrize("value", ['""', "5", "true"])
    def test_a_key_field_that_is_not_a_name_is_refused(self, tmp_path: Path, value: str) -> None:
        """An empty or non-string idempotency_key_field is a ConfigError naming the setting."""
        config = tmp_path / "nexus.toml"
        config.write_text(f'[[sources]]\nname = "billing"\nidempotency_key_field = {value}\n')

        with pytest.raises(ConfigError, match="idempotency_key_field"):
            load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_CONFIG": str(config)})

    def test_the_resend_window_is_60_seconds_unless_set(self, tmp_path: Path) -> None:
        """NEXUS_SHED_RESEND_WINDOW defaults to 60 s; 0 is allowed (off)."""
        assert load_settings({"NEXUS_DATA_DIR": str(tmp_path)}).shed_resend_window == 60.0
        off = load_settings({"NEXUS_DATA_DIR": str(tmp_path), "NEXUS_SHED_RESEND_WINDOW": "0"})
        assert off.shed_resend_window == 0.0


class TestKeyFromTheBody:
    """A source's idempotency_key_field: each entry's string field is its idempotency key."""

    def test_a_resent_entry_with_the_same_body_key_is_200_duplicate(self, keyed: Node) -> None:
        """An entry whose key field repeats a stored one's is 200 duplicate with the original id, stored once."""
        # Given an entry keyed by its "id"
        first = keyed.accepted({"id": "evt-1", "n": 1})

        # When another entry with the same "id" arrives (even with other content)
        again = keyed.post({"id": "evt-1", "n": 2})

        # Then it is the first one's duplicate, and only the first is stored
        assert again.status_code == 200
        assert again.json == {"payload_id": first, "status": "duplicate"}
        keyed.wait_delivered([first])
        keyed.wait_settled()
        assert payloads(keyed) == [{"id": "evt-1", "n": 1}]

    @pytest.mark.parametrize("value", [None, 5, ["evt-1"], {"k": "evt-1"}])
    def test_a_missing_or_non_string_field_gives_no_key(self, keyed: Node, value: object) -> None:
        """Without a string key field an entry has no key: the same body twice is stored twice."""
        body = {"n": 1} if value is None else {"id": value, "n": 1}

        ids = [keyed.accepted(body), keyed.accepted(body)]

        keyed.wait_delivered(ids)
        assert len(set(ids)) == 2

    @pytest.mark.parametrize("key", ["", "x" * 256, "a,b", "has space", "caf\u00e9"])
    def test_a_body_key_that_breaks_the_header_rules_is_400_and_nothing_is_stored(self, keyed: Node, key: str) -> None:
        """A string key field must be 1 to 255 visible ASCII characters without commas, or the write is 400."""
        result = keyed.post({"id": key})

        body = assert_error(result, 400, "invalid_idempotency_key")
        assert body["details"] == {"field": "id"}
        assert keyed.wal_pending == 0

    def test_the_field_is_read_only_for_the_source_that_names_it(self, harness: Harness) -> None:
        """Another source without a key field stores the same keyed body twice."""
        node = harness.start({"NEXUS_CONFIG": harness.config_file(KEYED_SOURCES_TOML)})
        other = {"Authorization": f"Bearer {OTHER_TOKEN}"}

        first = node.post({"id": "evt-1"}, source="other", token=None, headers=other)
        second = node.post({"id": "evt-1"}, source="other", token=None, headers=other)

        assert (first.status_code, second.status_code) == (202, 202)
        assert first.json["payload_id"] != second.json["payload_id"]

    def test_the_header_key_wins_over_the_body_key(self, keyed: Node) -> None:
        """With an Idempotency-Key header the body's field is not a key: the header's key alone counts."""
        # Given an entry sent with a header key and a body key
        first = keyed.accepted({"id": "evt-1"}, headers={"Idempotency-Key": "header-1"})

        # When the body key is used again without the header, and the header key again
        by_body = keyed.post({"id": "evt-1"})
        by_header = keyed.post({"id": "evt-9"}, headers={"Idempotency-Key": "header-1"})

        # Then the body key was never claimed, and the header key was
        assert by_body.status_code == 202
        assert by_header.json == {"payload_id": first, "status": "duplicate"}


class TestBatchElementKeys:
    """In a batch each element's body key counts on its own; duplicates are listed by index."""

    def test_seen_elements_are_duplicates_and_the_rest_are_stored(self, keyed: Node) -> None:
        """202 with payload_ids in element order (a seen element's is the original's) and duplicates: [indexes]."""
        # Given a batch keyed a, b
        first = keyed.post([{"id": "a"}, {"id": "b"}])
        assert first.status_code == 202
        a, b = first.json["payload_ids"]
        assert "duplicates" not in first.json

        # When a batch b, c arrives
        second = keyed.post([{"id": "b"}, {"id": "c"}])

        # Then b is answered with its original id, c is new, and b is not stored again
        assert second.status_code == 202, second.text
        assert second.json["status"] == "accepted"
        assert second.json["duplicates"] == [0]
        assert second.json["payload_ids"][0] == b
        c = second.json["payload_ids"][1]
        assert PAYLOAD_ID.fullmatch(c)
        assert c not in (a, b)
        keyed.wait_delivered([a, b, c])
        keyed.wait_settled()
        assert sorted(p["id"] for p in payloads(keyed)) == ["a", "b", "c"]

    @pytest.mark.parametrize("headers", [{}, NDJSON])
    def test_a_batch_of_seen_keys_only_is_200_duplicate(self, keyed: Node, headers: dict[str, str]) -> None:
        """When every element's key was seen, the batch is 200 duplicate with the original ids and stores nothing."""
        first = keyed.post([{"id": "a"}, {"id": "b"}]).json["payload_ids"]
        pending = keyed.wal_pending
        body = b"".join(orjson.dumps(v) + b"\n" for v in ({"id": "b"}, {"id": "a"})) if headers else None

        result = keyed.post([{"id": "b"}, {"id": "a"}], body=body, headers=headers)

        assert result.status_code == 200, result.text
        assert result.json == {"status": "duplicate", "payload_ids": [first[1], first[0]], "duplicates": [0, 1]}
        assert keyed.wal_pending <= pending

    def test_two_elements_with_one_key_store_one_entry(self, keyed: Node) -> None:
        """A key repeated inside one batch: the later element is a duplicate of the earlier, with its id."""
        result = keyed.post([{"id": "a", "n": 1}, {"n": 2}, {"id": "a", "n": 3}])

        assert result.status_code == 202, result.text
        ids = result.json["payload_ids"]
        assert ids[0] == ids[2] != ids[1]
        assert result.json["duplicates"] == [2]
        keyed.wait_delivered(ids)
        keyed.wait_settled()
        assert sorted(p["n"] for p in payloads(keyed)) == [1, 2]

    def test_an_element_key_and_a_single_entry_key_are_one_key(self, keyed: Node) -> None:
        """An entry stored alone with key k makes a batch element with key k a duplicate of it."""
        single = keyed.accepted({"id": "k"})

        result = keyed.post([{"id": "k"}, {"id": "fresh"}])

        assert result.json["payload_ids"][0] == single
        assert result.json["duplicates"] == [0]

    def test_an_invalid_element_key_is_400_with_its_index_and_nothing_is_stored(self, keyed: Node) -> None:
        """A batch element whose key breaks the rules refuses the whole batch with details.index."""
        result = keyed.post([{"id": "ok"}, {"id": "a,b"}])

        body = assert_error(result, 400, "invalid_idempotency_key")
        assert body["details"] == {"field": "id", "index": 1}
        assert keyed.wal_pending == 0
        assert keyed.post({"id": "ok"}).status_code == 202

    def test_a_header_key_names_the_whole_batch_and_element_keys_are_ignored(self, keyed: Node) -> None:
        """A batch with an Idempotency-Key header is keyed as a whole; its elements' fields are not claimed."""
        first = keyed.post([{"id": "a"}], headers={"Idempotency-Key": "batch-1"})
        assert first.status_code == 202

        again = keyed.post([{"id": "z"}], headers={"Idempotency-Key": "batch-1"})
        element = keyed.post([{"id": "a"}])

        assert again.json == {"status": "duplicate", "payload_ids": first.json["payload_ids"]}
        assert element.status_code == 202
        assert "duplicates" not in element.json

    def test_element_keys_survive_a_crash_between_the_wal_append_and_the_claim(self, harness: Harness) -> None:
        """Elements durable in the WAL whose keys were never claimed (the worker died) have them claimed at replay."""
        # Given a WAL directory holding two elements of a body-keyed batch, never claimed
        wal_dir = datadir.wal_root(harness.data_dir) / "w0"
        wal_dir.mkdir(parents=True, mode=0o700)
        entries = [
            make_entry(
                f"{i:032x}", payload=orjson.dumps({"id": key}), source="default", destination="default"
            )._replace(received_at=1_700_000_000.0, idempotency_key=key)
            for i, key in enumerate(["a", "b"])
        ]
        wal = Wal(wal_dir, logger=get_logger())
        wal.start()
        wal.append_many(entries)
        wal.close()

        # When a service starts on that data directory (with a window reaching back to them)
        node = harness.start({"NEXUS_IDEMPOTENCY_WINDOW": str(10 * 365 * 86_400), **KEY_FIELD})

        # Then both are delivered, and each key answers with its own entry
        ids = [entry.payload_id for entry in entries]
        node.wait_delivered(ids)
        again = node.post([{"id": "b"}, {"id": "a"}])
        assert again.json == {"status": "duplicate", "payload_ids": [ids[1], ids[0]], "duplicates": [0, 1]}

    def test_a_shed_batch_reports_its_duplicates_too(self, harness: Harness, request: pytest.FixtureRequest) -> None:
        """A durable 429 for a keyed batch carries payload_ids and duplicates, in details too."""
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable", **KEY_FIELD})
        fill_queue(node)
        seen = shed_id(node, b'{"id": "seen"}')

        result = node.post([{"id": "seen"}, {"id": "new"}])

        body = assert_error(result, 429, "queue_full", extra=frozenset({"payload_ids", "duplicates"}))
        assert body["payload_ids"][0] == seen
        assert body["duplicates"] == body["details"]["duplicates"] == [0]


class TestResendWindow:
    """Within NEXUS_SHED_RESEND_WINDOW after a durable 429 without a key, the same body again is a duplicate."""

    def test_a_resend_of_a_shed_entry_is_200_duplicate_and_stores_nothing(self, shedding: Node) -> None:
        """The same bytes again from one source: 200 duplicate with the 429's payload_id, nothing new in the WAL."""
        # Given an entry answered with a durable 429
        body = b'{"shed": 1}'
        original = shed_id(shedding, body)
        pending = shedding.wal_pending

        # When the client resends it, without any key
        resend = shedding.post(body=body)

        # Then it is recognised
        assert resend.status_code == 200
        assert resend.json == {"payload_id": original, "status": "duplicate"}
        assert shedding.wal_pending == pending

    @pytest.mark.parametrize("headers", [{}, NDJSON])
    def test_a_resend_of_a_shed_batch_is_200_duplicate_with_every_id(
        self, shedding: Node, headers: dict[str, str]
    ) -> None:
        """A batch answered with a durable 429, resent byte for byte: 200 duplicate with its payload_ids."""
        body = b'[{"n": 1}, {"n": 2}]' if not headers else b'{"n": 1}\n{"n": 2}\n'
        shed = shedding.post(body=body, headers=headers)
        assert shed.status_code == 429
        pending = shedding.wal_pending

        resend = shedding.post(body=body, headers=headers)

        assert resend.status_code == 200
        assert resend.json == {"status": "duplicate", "payload_ids": shed.json["payload_ids"]}
        assert shedding.wal_pending == pending

    @pytest.mark.parametrize("other", [b'{"shed": 2}', b'{"shed":1}', b'{"shed": 1} '])
    def test_a_body_that_differs_by_one_byte_is_not_a_resend(self, shedding: Node, other: bytes) -> None:
        """Only a byte-for-byte identical body is a resend: another value, or other whitespace, is a new entry."""
        original = shed_id(shedding, b'{"shed": 1}')

        assert shed_id(shedding, other) != original

    def test_the_same_body_from_another_source_is_not_a_resend(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """The window is per source: another source's identical body is its own entry."""
        toml = harness.config_file(KEYED_SOURCES_TOML.replace('idempotency_key_field = "id"\n', ""))
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable", "NEXUS_CONFIG": toml})
        fill_queue(node)
        original = shed_id(node, b'{"shed": 1}')

        other = shed_id(node, b'{"shed": 1}', source="other", token=OTHER_TOKEN)

        assert other != original

    def test_an_accepted_body_is_not_remembered(self, node_blocked_free: Node) -> None:
        """Only a durable 429 opens the window: a body answered 202, sent again, is stored again."""
        first = node_blocked_free.accepted({"n": 1})

        assert node_blocked_free.accepted({"n": 1}) != first

    def test_a_keyed_request_neither_opens_nor_uses_the_window(self, shedding: Node) -> None:
        """A shed write with a key is not remembered by body, and a keyed write is never matched by body."""
        # Given a shed body with a key, and the same body without one
        keyed = shed_id(shedding, b'{"a": 1}', headers={"Idempotency-Key": "k-1"})
        assert shed_id(shedding, b'{"a": 1}') != keyed
        # Given a shed body without a key
        unkeyed = shed_id(shedding, b'{"b": 1}')

        # When the same body comes with a key
        with_key = shed_id(shedding, b'{"b": 1}', headers={"Idempotency-Key": "k-2"})

        # Then it is its own entry: its key, not its body, decides
        assert with_key != unkeyed

    def test_a_resend_after_the_window_is_stored_again(self, shedding: Node, harness: Harness) -> None:
        """Once the window has passed, the same body is a new entry."""
        original = shed_id(shedding, b'{"shed": 1}')
        expire_shed_bodies(harness.data_dir)

        assert shed_id(shedding, b'{"shed": 1}') != original

    def test_a_window_of_0_turns_it_off(self, harness: Harness, request: pytest.FixtureRequest) -> None:
        """NEXUS_SHED_RESEND_WINDOW=0: a resend of a shed body is stored again, and no window file is made."""
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable", "NEXUS_SHED_RESEND_WINDOW": "0"})
        fill_queue(node)
        original = shed_id(node, b'{"shed": 1}')

        assert shed_id(node, b'{"shed": 1}') != original
        assert not (harness.data_dir / resend_window.DB_FILENAME).exists()

    def test_nothing_shed_keeps_writes_off_the_window_table(
        self, shedding: Node, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Writes look in the shared table only after some worker answered a durable 429 (the hint is up)."""
        resends = shedding.service.resends
        assert resends is not None
        lookups: list[bytes] = []
        real_lookup = resends.lookup

        def counted(source: str, body: bytes) -> Any:
            lookups.append(body)
            return real_lookup(source, body)

        monkeypatch.setattr(resends, "lookup", counted)
        # Given a full queue but no 429 yet
        assert not resends.active()

        # When a 429 is answered, and another write follows
        shed_id(shedding, b'{"shed": 1}')
        shedding.post(body=b'{"shed": 2}')

        # Then only the write after the 429 looked
        assert resends.active()
        assert lookups == [b'{"shed": 2}']

    def test_the_429_says_stored_do_not_resend_and_when_a_resend_is_safe(self, shedding: Node) -> None:
        """The durable 429's message says the entry is stored, not to resend, and that a resend is safe."""
        message = shedding.post(body=b'{"shed": 1}').json["message"]

        assert "stored" in message
        assert "do not resend" in message
        assert "idempotency key" in message
        assert "same body within 60 s" in message

    def test_expired_bodies_are_pruned_while_running(
        self, harness: Harness, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The prune loop forgets shed bodies past their expiry, beside the idempotency keys."""
        # Given a running service that prunes often, and a remembered shed body
        monkeypatch.setattr(service_module, "PRUNE_INTERVAL", 0.05)
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable"})
        fill_queue(node)
        shed_id(node, b'{"shed": 1}')
        assert shed_bodies(harness.data_dir) == 1

        # When its expiry passes
        expire_shed_bodies(harness.data_dir)

        # Then it is forgotten without any request
        wait_until(lambda: shed_bodies(harness.data_dir) == 0, what="the expired shed body pruned")

    def test_the_reject_policy_remembers_nothing(self, harness: Harness, request: pytest.FixtureRequest) -> None:
        """Under `reject` a 429 stores nothing, so nothing is remembered and no window file is made."""
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "reject"})
        fill_queue(node)

        assert node.post(body=b'{"shed": 1}').status_code == 429
        assert node.service.resends is None
        assert not (harness.data_dir / resend_window.DB_FILENAME).exists()


@pytest.fixture
def node_blocked_free(harness: Harness) -> Node:
    """A durable node with room in its queue."""
    return harness.start({"NEXUS_SHED_POLICY": "durable"})


# -- real gunicorn ---------------------------------------------------------------------

#: One queue slot and one delivery greenlet a worker: each worker holds two entries, then sheds.
TINY_QUEUE = {"NEXUS_QUEUE_SIZE": "1", "NEXUS_QUEUE_WORKERS": "1"}
#: Distinct entries the urllib3 client sends, one thread each, so that most are shed at once.
URLLIB3_ENTRIES = 12


def worker_pid(conn: http.client.HTTPConnection) -> int:
    """The pid of the worker serving this keep-alive connection (GET /admin/status on it)."""
    conn.request("GET", "/admin/status", headers=admin_headers())
    response = conn.getresponse()
    body = orjson.loads(response.read())
    assert response.status == 200, body
    pid: int = body["worker"]["pid"]
    return pid


def one_connection_per_worker(server: Gunicorn) -> dict[int, http.client.HTTPConnection]:
    """Keep-alive connections until two different workers serve one each (gunicorn's kernel accept picks)."""
    held: dict[int, http.client.HTTPConnection] = {}
    spare: list[http.client.HTTPConnection] = []

    def two() -> bool:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
        pid = worker_pid(conn)
        if pid in held:
            spare.append(conn)
        else:
            held[pid] = conn
        return len(held) == 2

    try:
        wait_for(two, 30, "a connection to each of the two workers", interval=0)
    finally:
        for conn in spare:
            conn.close()
    return held


def post_on(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, Any]:
    conn.request("POST", "/inbound/default", body=body, headers=post_headers())
    response = conn.getresponse()
    return response.status, orjson.loads(response.read())


class TestResendWindowAcrossWorkers:
    """The window is shared by the workers of one instance: the resend may land on the other one."""

    def test_a_resend_to_the_other_worker_is_a_duplicate(self, launch: Launcher) -> None:
        """A body shed by one worker, resent to the other, is 200 duplicate there; it is stored once."""
        # Given two workers, a connection to each, and a destination held busy
        server = ready(launch(workers=2, env=TINY_QUEUE))
        (first_pid, first), (second_pid, second) = one_connection_per_worker(server).items()
        assert first_pid != second_pid
        try:
            with destination_locked(server.db_path):
                # When the first worker sheds an entry
                for n in range(20):
                    status, answer = post_on(first, orjson.dumps({"n": n}))
                    if status == 429:
                        break
                    assert status == 202, answer
                assert status == 429, answer
                assert answer["details"]["durable"] is True
                # ... and the client resends it to the second worker
                status_again, again = post_on(second, orjson.dumps({"n": n}))
                # Then the second worker recognises it
                assert (status_again, again) == (200, {"payload_id": answer["payload_id"], "status": "duplicate"})
                assert worker_pid(second) == second_pid
            # ... and, once the destination is back, every entry is stored once
            wait_for(lambda: len(stored_markers(server.db_path)) == n + 1, 60, "every entry delivered")
            assert sorted(-1 if m is None else m for _pid, m in stored_markers(server.db_path)) == list(range(n + 1))
        finally:
            first.close()
            second.close()


class TestStockUrllib3Retry:
    """urllib3's own Retry, resending on 429 after Retry-After without any key, stores every entry once."""

    def test_urllib3_retry_on_429_without_a_key_stores_each_entry_once(self, launch: Launcher) -> None:
        """Distinct entries through Retry(status_forcelist=[429]) over a full queue: each stored exactly once."""
        # Given two workers with one queue slot each, and a destination held busy
        server = ready(launch(workers=2, env=TINY_QUEUE))
        retry = Retry(
            total=5,
            status_forcelist=[429],
            respect_retry_after_header=True,
            allowed_methods=None,
            backoff_factor=0,
            raise_on_status=False,
        )
        pool = urllib3.PoolManager(maxsize=URLLIB3_ENTRIES, retries=retry)
        url = f"http://{HOST}:{server.port}/inbound/default"
        start = threading.Barrier(URLLIB3_ENTRIES)

        def send(n: int) -> urllib3.BaseHTTPResponse:
            start.wait()
            return pool.request("POST", url, body=orjson.dumps({"n": n}), headers=post_headers())

        with destination_locked(server.db_path):
            # When each entry is sent at once, and resent by urllib3 after every 429
            with ThreadPoolExecutor(URLLIB3_ENTRIES) as threads:
                responses = list(threads.map(send, range(URLLIB3_ENTRIES)))
            # Then every request ends answered (202, or 200 duplicate after a resend) ...
            statuses = [r.status for r in responses]
            assert set(statuses) <= {200, 202}, statuses
            # ... and urllib3 did resend after 429s, without any key
            resent = [r for r in responses if r.retries is not None and r.retries.history]
            assert resent, "no request was shed: the queue never filled"
            assert all(h.status == 429 for r in resent for h in r.retries.history)  # type: ignore[union-attr]
            assert sum(r.status == 200 for r in responses) == len(resent)
        pool.clear()

        # Then, with the destination back, the rows are the distinct entries, each once ...
        wait_for(
            lambda: len(stored_markers(server.db_path)) >= URLLIB3_ENTRIES,
            60,
            "every entry delivered",
            describe=lambda: str(sorted(-1 if m is None else m for _p, m in stored_markers(server.db_path))),
        )
        markers = sorted(m for _pid, m in stored_markers(server.db_path) if m is not None)
        assert markers == list(range(URLLIB3_ENTRIES))
        # ... and the service stored no more than those (nothing is left to deliver later)
        text = scrape(server.port)
        stored = metric_sum(text, "nexus_writes_accepted_total") + metric_sum(text, "nexus_writes_shed_total")
        assert stored == URLLIB3_ENTRIES
        assert metric_sum(text, "nexus_writes_duplicate_total") == len(resent)
        ids = {orjson.loads(r.data)["payload_id"] for r in responses}
        assert ids == {pid for pid, _m in stored_markers(server.db_path)}
