"""Batches on POST /inbound/{source}: a JSON array of objects, or NDJSON, each element one entry.

In-process tests run the Falcon app on a real service (tests/test_http.py's Harness and
Node); the last class runs real gunicorn and kills it with SIGKILL while batches are
being written.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import sqlite3
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import falcon.testing
import orjson
import pytest

from nexus_gevent import datadir
from nexus_gevent._json_limits import MAX_NESTING
from nexus_gevent.idempotency import SCHEMA_VERSION
from nexus_gevent.logs import get_logger
from nexus_gevent.testing import make_entry, wait_until
from nexus_gevent.wal import Wal
from nexus_gevent.wal.replay import replay_directory
from tests.support.proc import (
    SOURCE,
    KeepAlive,
    Launcher,
    Ledger,
    assert_exactly_once,
    post_headers,
    wait_delivered,
    wait_for,
)
from tests.test_http import (
    PAYLOAD_ID,
    Harness,
    Node,
    WriteLock,
    assert_error,
    failing_wal_write,
    fill_queue,
    start_blocked,
)
from tests.test_wal import FaultyCall, is_write_through

NDJSON = {"Content-Type": "application/x-ndjson"}
JSONL = {"Content-Type": "application/jsonl"}


def ndjson(*values: object) -> bytes:
    return b"".join(orjson.dumps(v) + b"\n" for v in values)


def accepted_ids(result: falcon.testing.Result, count: int) -> list[str]:
    """Check a batch's 202 and return its payload_ids."""
    assert result.status_code == 202, result.text
    assert set(result.json) == {"status", "payload_ids"}
    assert result.json["status"] == "accepted"
    ids: list[str] = result.json["payload_ids"]
    assert len(ids) == count
    assert all(PAYLOAD_ID.fullmatch(pid) for pid in ids)
    assert len(set(ids)) == count
    return ids


def stored(node: Node) -> dict[str, Any]:
    """payload_id -> the stored payload, parsed."""
    return {row["payload_id"]: orjson.loads(row["payload"]) for row in node.rows()}


class TestBatchAccepted:
    """202 {"status": "accepted", "payload_ids": [...]}: one entry per element, ids in element order."""

    def test_a_json_array_stores_one_row_per_element_with_ids_in_order(self, node: Node) -> None:
        """Each element of an array is its own entry; payload_ids[i] is element i's id."""
        elements = [{"n": i, "tag": "array"} for i in range(5)]

        ids = accepted_ids(node.post(elements), 5)
        node.wait_delivered(ids)

        rows = stored(node)
        assert len(rows) == 5
        assert [rows[pid] for pid in ids] == elements

    @pytest.mark.parametrize("headers", [NDJSON, JSONL], ids=["x-ndjson", "jsonl"])
    def test_ndjson_stores_one_row_per_line_with_ids_in_order(self, node: Node, headers: dict[str, str]) -> None:
        """Each line of NDJSON is one entry, stored as sent; blank lines and the final newline are not entries."""
        lines = [b'{"n": 0}', b'{"n":1,  "spaced": true}', b'{"n": 2}']
        body = lines[0] + b"\n\n" + lines[1] + b"\r\n   \n" + lines[2] + b"\n"

        ids = accepted_ids(node.post(body=body, headers=headers), 3)
        node.wait_delivered(ids)

        raw = {row["payload_id"]: row["payload"] for row in node.rows()}
        assert [raw[pid] for pid in ids] == [line.decode() for line in lines]

    def test_batch_entries_carry_the_subject_and_the_batch_key(self, node: Node) -> None:
        """X-Subject and the Idempotency-Key of a batch are on every one of its rows."""
        ids = accepted_ids(node.post([{"n": 1}, {"n": 2}], headers={"X-Subject": "s-1", "Idempotency-Key": "b-1"}), 2)
        node.wait_delivered(ids)

        assert {(row["subject"], row["idempotency_key"]) for row in node.rows()} == {("s-1", "b-1")}

    def test_a_single_object_is_still_answered_with_one_payload_id(self, node: Node) -> None:
        """A body that is one object keeps the single-entry answer {"payload_id", "status"}."""
        result = node.post({"n": 1})

        assert result.status_code == 202
        assert set(result.json) == {"payload_id", "status"}

    def test_a_batch_of_max_batch_entries_is_accepted(self, harness: Harness) -> None:
        """Exactly NEXUS_MAX_BATCH_ENTRIES elements is a batch like any other."""
        node = harness.start({"NEXUS_MAX_BATCH_ENTRIES": "3"})

        accepted_ids(node.post([{"n": i} for i in range(3)]), 3)


class TestBatchRefused:
    """All or nothing: one bad element refuses the batch, names its index, and stores nothing."""

    @pytest.mark.parametrize(
        ("elements", "index"),
        [([{"n": 0}, 1, {"n": 2}], 1), ([{"n": 0}, {"n": 1}, [{"n": 2}]], 2), (["x"], 0), ([{"n": 0}, None], 1)],
        ids=["number", "array", "string", "null"],
    )
    def test_a_non_object_element_is_400_with_its_index(self, node: Node, elements: list[object], index: int) -> None:
        """An array element that is not an object: 400 invalid_body, details.index, nothing stored."""
        before = node.wal_pending

        body = assert_error(node.post(elements), 400, "invalid_body")

        assert body["details"]["index"] == index
        assert node.wal_pending == before

    def test_an_invalid_json_line_is_400_invalid_json_with_its_index(self, node: Node) -> None:
        """An NDJSON line that is not JSON: 400 invalid_json, details.index counting entries (not blank lines)."""
        body_bytes = b'{"n": 0}\n\n{"n": 1}\n{"n": 2\n{"n": 3}\n'

        body = assert_error(node.post(body=body_bytes, headers=NDJSON), 400, "invalid_json")

        assert body["details"]["index"] == 2
        assert node.wal_pending == 0

    def test_a_non_object_line_is_400_invalid_body_with_its_index(self, node: Node) -> None:
        """An NDJSON line holding an array or a number: 400 invalid_body, details.index."""
        body = assert_error(node.post(body=b'{"n": 0}\n[1, 2]\n', headers=NDJSON), 400, "invalid_body")

        assert body["details"]["index"] == 1
        assert node.wal_pending == 0

    @pytest.mark.parametrize("form", ["array", "ndjson"])
    def test_an_element_nested_too_deep_is_400_with_its_index(self, node: Node, form: str) -> None:
        """An element nested deeper than 128 levels: 400 invalid_body, details.index and max_nesting."""
        deep: object = {"leaf": 1}
        for _ in range(MAX_NESTING):
            deep = {"d": deep}
        elements = [{"n": 0}, {"n": 1}, deep]
        result = node.post(elements) if form == "array" else node.post(body=ndjson(*elements), headers=NDJSON)

        body = assert_error(result, 400, "invalid_body")

        assert body["details"] == {"index": 2, "max_nesting": MAX_NESTING}
        assert node.wal_pending == 0

    def test_an_element_at_the_nesting_limit_is_accepted(self, node: Node) -> None:
        """Nesting counts from the element, not from the array around it: 128 levels in an array pass."""
        deep: object = {"leaf": 1}
        for _ in range(MAX_NESTING - 1):
            deep = {"d": deep}

        accepted_ids(node.post([deep]), 1)

    def test_nothing_of_a_refused_batch_reaches_the_destination(self, node: Node) -> None:
        """The good elements before a bad one are not stored either; a later good write is the only row."""
        assert node.post([{"marker": "refused"}, "bad"]).status_code == 400

        later = node.accepted({"n": 1})
        node.wait_delivered([later])
        node.wait_settled()

        assert node.delivered_ids() == [later]

    @pytest.mark.parametrize(
        ("body", "headers"), [(b"[]", {}), (b" [ ] ", {}), (b"", NDJSON), (b"\n\n  \n", JSONL)], ids=str
    )
    def test_an_empty_batch_is_400(self, node: Node, body: bytes, headers: dict[str, str]) -> None:
        """An empty array, or NDJSON without a line, is 400 invalid_body."""
        assert_error(node.post(body=body, headers=headers), 400, "invalid_body")
        assert node.wal_pending == 0

    @pytest.mark.parametrize("form", ["array", "ndjson"])
    def test_more_than_max_batch_entries_is_413(self, node: Node, form: str) -> None:
        """1001 elements (the default limit is 1000): 413 batch_too_large, nothing stored."""
        elements = [{"n": i} for i in range(1001)]
        result = node.post(elements) if form == "array" else node.post(body=ndjson(*elements), headers=NDJSON)

        body = assert_error(result, 413, "batch_too_large")

        assert body["details"] == {"entries": 1001, "max_batch_entries": 1000}
        assert node.wal_pending == 0


class TestBatchDurability:
    """The whole batch is one durable WAL write, and it is answered only once that write succeeded."""

    def test_a_batch_is_made_durable_by_one_wal_write(
        self, harness: Harness, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """200 entries: one O_DSYNC write on the WAL, after which all 200 are pending (and none before it)."""
        # Given a service whose deliveries wait (no mark is written meanwhile)
        node = harness.start()
        lock = WriteLock(node.db_path)
        request.addfinalizer(lock.release)
        writes = FaultyCall(os.write, only=is_write_through)
        monkeypatch.setattr(os, "write", writes)

        # When a batch of 200 is written
        ids = accepted_ids(node.post([{"n": i} for i in range(200)]), 200)

        # Then one durable write made all of it durable
        monkeypatch.undo()
        assert writes.calls == 1
        assert all(node.service.wal.is_pending(pid) for pid in ids)
        found = replay_directory(node.service.lock.path).pending
        assert set(ids) <= set(found)

    def test_a_failed_wal_write_acknowledges_nothing_of_the_batch(
        self, node: Node, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When the WAL cannot write, the batch is 503 wal_unavailable without payload_ids, and nothing is pending."""
        monkeypatch.setattr(os, "write", failing_wal_write)

        body = assert_error(node.post([{"n": 1}, {"n": 2}]), 503, "wal_unavailable")

        assert "payload_ids" not in body["details"]
        assert node.wal_pending == 0


class TestBatchQueueFull:
    """A full queue: under durable every entry waits and is delivered; under reject all of it fits or none is stored."""

    def test_durable_a_batch_over_a_full_queue_is_429_with_every_payload_id(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """429 queue_full with Retry-After and the batch's payload_ids; each is pending in the WAL."""
        node, _lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable"})
        fill_queue(node)

        result = node.post([{"shed": i} for i in range(3)])

        body = assert_error(result, 429, "queue_full", extra=frozenset({"payload_ids"}))
        assert len(body["payload_ids"]) == 3
        assert body["details"] == {"payload_ids": body["payload_ids"], "durable": True}
        assert all(node.service.wal.is_pending(pid) for pid in body["payload_ids"])

    def test_durable_shed_batch_entries_are_delivered_without_a_restart(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """Every entry of a 429'd batch reaches the destination once the queue has room, in the same service."""
        # Given a full queue and a batch answered 429
        node, lock = start_blocked(harness, request, {"NEXUS_SHED_POLICY": "durable"})
        accepted = fill_queue(node)
        shed = node.post([{"shed": i} for i in range(4)]).json["payload_ids"]

        # When the destination can take writes again
        lock.release()

        # Then everything acknowledged is delivered, once
        node.wait_delivered(accepted + shed)
        node.wait_settled()
        delivered = node.delivered_ids()
        assert sorted(delivered) == sorted(accepted + shed)

    def test_reject_a_batch_larger_than_the_room_is_429_and_nothing_is_stored(
        self, harness: Harness, request: pytest.FixtureRequest
    ) -> None:
        """Two free slots and a batch of three: 429 queue_full, nothing in the WAL; a batch of two then fits."""
        # Given a queue of two slots, both free, whose deliveries wait
        node = harness.start({"NEXUS_QUEUE_SIZE": "3", "NEXUS_QUEUE_WORKERS": "1", "NEXUS_SHED_POLICY": "reject"})
        lock = WriteLock(node.db_path)
        request.addfinalizer(lock.release)
        node.accepted({"fill": 0})
        wait_until(lambda: node.backlog.queue.depth == 0, what="the delivery greenlet took the first entry")
        node.accepted({"fill": 1})
        assert node.backlog.room == 2
        before = node.wal_pending

        # When a batch of three arrives
        result = node.post([{"n": i} for i in range(3)])

        # Then none of it is stored, and the room is still there for a batch that fits
        body = assert_error(result, 429, "queue_full")
        assert "payload_ids" not in body
        assert "payload_ids" not in body["details"]
        assert node.wal_pending == before
        assert node.backlog.room == 2
        accepted_ids(node.post([{"n": 0}, {"n": 1}]), 2)


#: Burst 5, refilling too slowly to matter during a test.
SLOW = {"NEXUS_RATE_LIMIT_PER_SECOND": "0.001", "NEXUS_RATE_LIMIT_BURST": "5"}


class TestBatchRateLimit:
    """A batch of n entries takes n of its source's tokens."""

    def test_a_batch_takes_one_token_per_entry(self, harness: Harness) -> None:
        """Burst 5: a batch of 3 passes, a second of 3 is 429 with nothing stored, a batch of 2 then passes."""
        node = harness.start(SLOW)

        accepted_ids(node.post([{"n": i} for i in range(3)]), 3)
        assert_error(node.post([{"n": i} for i in range(3)]), 429, "rate_limit_exceeded")
        assert node.wal_pending <= 3
        accepted_ids(node.post([{"n": 0}, {"n": 1}]), 2)

    def test_a_batch_larger_than_the_burst_is_413(self, harness: Harness) -> None:
        """A batch that could never pass the limit is 413 batch_too_large (naming the burst), not a 429 to retry."""
        node = harness.start(SLOW)

        body = assert_error(node.post([{"n": i} for i in range(6)]), 413, "batch_too_large")

        assert body["details"]["rate_limit_burst"] == 5
        assert body["details"]["entries"] == 6
        # ... and it took no token: a full burst still passes
        accepted_ids(node.post([{"n": i} for i in range(5)]), 5)


class TestBatchIdempotency:
    """An Idempotency-Key on a batch names the whole batch."""

    def test_a_resent_batch_is_200_duplicate_with_the_original_list(self, node: Node) -> None:
        """The same key again: 200 {"status": "duplicate", "payload_ids": the first answer's list}; stored once."""
        elements = [{"n": i} for i in range(4)]
        ids = accepted_ids(node.post(elements, headers={"Idempotency-Key": "batch-1"}), 4)

        again = node.post(elements, headers={"Idempotency-Key": "batch-1"})

        assert again.status_code == 200
        assert again.json == {"status": "duplicate", "payload_ids": ids}
        node.wait_delivered(ids)
        node.wait_settled()
        assert sorted(node.delivered_ids()) == sorted(ids)

    def test_a_single_write_with_a_batch_key_is_answered_with_the_batch(self, node: Node) -> None:
        """A key names what it was first sent with: a one-object body reusing a batch's key gets the batch's list."""
        ids = accepted_ids(node.post([{"n": 0}, {"n": 1}], headers={"Idempotency-Key": "shared"}), 2)

        again = node.post({"n": 0}, headers={"Idempotency-Key": "shared"})

        assert again.status_code == 200
        assert again.json == {"status": "duplicate", "payload_ids": ids}

    def test_a_batch_key_is_remembered_across_a_restart(self, harness: Harness) -> None:
        """After a restart on the same data dir, the batch's key still answers with its original list."""
        # Given a batch accepted and delivered by a service that then stops
        first = harness.start()
        ids = accepted_ids(first.post([{"n": 0}, {"n": 1}, {"n": 2}], headers={"Idempotency-Key": "kept"}), 3)
        first.wait_delivered(ids)
        assert first.service.shutdown(5)

        # When the batch is resent to a new service
        second = harness.start()
        again = second.post([{"n": 0}, {"n": 1}, {"n": 2}], headers={"Idempotency-Key": "kept"})

        # Then it is the duplicate of the first, and nothing more is stored
        assert again.status_code == 200
        assert again.json == {"status": "duplicate", "payload_ids": ids}
        second.wait_settled()
        assert sorted(second.delivered_ids()) == sorted(ids)

    def test_a_batch_key_survives_a_crash_between_the_wal_append_and_the_claim(self, harness: Harness) -> None:
        """A keyed batch durable in the WAL but never claimed (the worker died) is claimed whole at replay."""
        # Given a WAL directory holding a keyed batch of three whose key was never claimed
        wal_dir = datadir.wal_root(harness.data_dir) / "w0"
        wal_dir.mkdir(parents=True, mode=0o700)
        entries = [
            make_entry(f"{i:032x}", payload=orjson.dumps({"n": i}), source="default", destination="default")._replace(
                received_at=1_700_000_000.0, idempotency_key="crashed", batch=(i, 3)
            )
            for i in range(3)
        ]
        wal = Wal(wal_dir, logger=get_logger())
        wal.start()
        wal.append_many(list(reversed(entries)))
        wal.close()

        # When a service starts on that data directory (with a window reaching back to the batch)
        node = harness.start({"NEXUS_IDEMPOTENCY_WINDOW": str(10 * 365 * 86_400)})

        # Then the batch is delivered, and its key answers with the whole list, in batch order
        ids = [entry.payload_id for entry in entries]
        node.wait_delivered(ids)
        again = node.post([{"n": 0}], headers={"Idempotency-Key": "crashed"})
        assert again.json == {"status": "duplicate", "payload_ids": ids}


class TestIndexMigration:
    """An idempotency.db from before batches opens, is migrated, and keeps answering its keys."""

    def test_an_index_without_the_payload_ids_column_is_migrated_and_keeps_its_keys(self, harness: Harness) -> None:
        """Version 0 (no payload_ids): the column is added, user_version set, and an old key is still a duplicate."""
        # Given an index file in the schema of the last release, holding one key
        path = datadir.idempotency_file(harness.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        old_id = "ab" * 16
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute(
                "CREATE TABLE idempotency_keys (source TEXT NOT NULL, key TEXT NOT NULL, payload_id TEXT NOT NULL,"
                " created_at REAL NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID"
            )
            conn.execute("INSERT INTO idempotency_keys VALUES ('default', 'old-key', ?, 4e9)", (old_id,))

        # When the service opens it
        node = harness.start()

        # Then the old key answers as before, and batches can be keyed
        assert node.post({"n": 1}, headers={"Idempotency-Key": "old-key"}).json == {
            "payload_id": old_id,
            "status": "duplicate",
        }
        accepted_ids(node.post([{"n": 1}], headers={"Idempotency-Key": "new-key"}), 1)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
        assert "payload_ids" in columns


# -- real gunicorn, kill -9 -------------------------------------------------------------

#: Client threads writing batches at once.
BATCH_WRITERS = 6
#: Entries per batch.
BATCH_SIZE = 25
#: Acknowledged entries before the kill, so that there is something to lose.
ACKED_BEFORE_KILL = 1500


class BatchWriters:
    """Client threads POSTing batches of {"n": <unique int>} over keep-alive connections, recording a Ledger.

    Each element's marker is recorded as sent; a 202 or a durable 429 acknowledges every
    payload_id of the batch, paired with its element's marker; a request that fails on the
    wire loses all its markers and is never resent.
    """

    def __init__(self, port: int, *, ledger: Ledger | None = None) -> None:
        self.port = port
        self.ledger = ledger if ledger is not None else Ledger()
        self._numbers = itertools.count()
        self._numbers_lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=BATCH_WRITERS, thread_name_prefix="batch-writer")
        self._futures: list[Future[None]] = []

    def start(self) -> None:
        self._futures = [self._pool.submit(self._run) for _ in range(BATCH_WRITERS)]

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout)
        self._pool.shutdown(wait=True)

    def _batch(self) -> list[int]:
        with self._numbers_lock:
            return [next(self._numbers) for _ in range(BATCH_SIZE)]

    def _run(self) -> None:
        headers = post_headers()
        with contextlib.closing(KeepAlive(self.port)) as client:
            while not self._stop.is_set():
                markers = self._batch()
                for n in markers:
                    self.ledger.record_sent(n)
                body = json.dumps([{"n": n} for n in markers]).encode()
                try:
                    response = client.post(f"/inbound/{SOURCE}", body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    for n in markers:
                        self.ledger.record_lost(n, exc)
                    # Not a synchronisation: a pause so a dead port is not hammered.
                    self._stop.wait(0.01)
                    continue
                self.ledger.record_answer(markers, response.status, response.body)


class TestBatchCrash:
    """kill -9 while batches are being written: every acknowledged payload_id of every batch exactly once."""

    def test_kill9_mid_batches_then_restart_stores_every_acknowledged_entry_once(self, launch: Launcher) -> None:
        """SIGKILL of the master and both workers while batches stream in; the restart delivers each ack once."""
        # Given two workers taking batches continuously
        first = launch()
        first.wait_ready()
        writers = BatchWriters(first.port)
        writers.start()
        try:
            # When everything is killed with SIGKILL while batches are in flight
            wait_for(
                lambda: writers.ledger.acked_count >= ACKED_BEFORE_KILL,
                60,
                "acknowledged batches",
                describe=lambda: f"outcomes so far: {dict(writers.ledger.outcomes)}",
            )
            first.kill9_all()
        finally:
            writers.stop()
        acked = writers.ledger.snapshot_acked()
        assert len(acked) >= ACKED_BEFORE_KILL

        # Then a restart on the same data dir delivers every acknowledged entry
        second = launch()
        second.wait_ready()
        wait_delivered(second.db_path, acked, timeout=60)
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0, second.log_tail()
        # ... exactly once; rows without an ack are only from batches whose response the kill lost
        assert_exactly_once(writers.ledger, second, responses_may_be_lost=True)
