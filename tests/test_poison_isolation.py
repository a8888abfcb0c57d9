"""Poison entries retrying beside healthy writes, on a real WAL and a real SQLite destination.

A trigger on `nexus_entries` refuses every payload that holds a marker, as a destination-side
constraint would. Healthy writes keep flowing meanwhile; what is measured is the time from a
202 to the row being in the destination file.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import falcon.testing
import gevent  # type: ignore[import-untyped, unused-ignore]
import orjson
import pytest

from nexus_gevent import lifecycle
from nexus_gevent.config import load_settings
from nexus_gevent.destinations import sqlite_path
from nexus_gevent.http.app import create_app
from nexus_gevent.service import Service
from nexus_gevent.testing import RecordingLogger, wait_until

TOKEN = "poison-source-token-5a1e"
ADMIN_TOKEN = "poison-admin-token-0c3d"
MARKER = "poison-marker-7f"
#: Backoff long enough that a delivery greenlet held by it would show in any latency figure.
INITIAL_BACKOFF = 2.0
MAX_ATTEMPTS = 3
#: More poison entries than delivery greenlets, so that holding them would stall the queue.
WORKERS = 2
POISON_ENTRIES = 4
#: Healthy writes and their pace: about 6 s, the poison entries' whole retry schedule (2 s + 4 s).
HEALTHY_WRITES = 120
PACE = 0.05
#: Held greenlets would delay healthy entries by up to a backoff (2-4 s); their p99 stays far below.
HEALTHY_P99_BOUND = 1.0


class Running:
    """A started service, a client on its app, and a watcher that notes when each row lands."""

    def __init__(self, service: Service, logger: RecordingLogger) -> None:
        self.service = service
        self.logger = logger
        self.client = falcon.testing.TestClient(create_app(service, logger))
        self.db_path = sqlite_path(service.settings.destination("default").url)
        self.landed: dict[str, float] = {}
        self._watcher = gevent.spawn(self._watch)

    def write(self, payload: dict[str, object]) -> tuple[str, float]:
        """POST one entry; its payload_id and when its 202 came."""
        result = self.client.simulate_post(
            "/inbound/default", body=orjson.dumps(payload), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert result.status_code == 202, result.text
        return str(result.json["payload_id"]), time.monotonic()

    def _watch(self) -> None:
        conn = sqlite3.connect(self.db_path, isolation_level=None)
        last = 0
        try:
            while True:
                for seq, payload_id in conn.execute(
                    "SELECT seq, payload_id FROM nexus_entries WHERE seq > ? ORDER BY seq", (last,)
                ):
                    self.landed.setdefault(payload_id, time.monotonic())
                    last = seq
                gevent.sleep(0.005)
        finally:
            conn.close()

    def has_failed(self, payload_id: str) -> bool:
        """True once a write holding the entry has failed."""
        return any(
            r.event == "delivery_failed" and payload_id in r.fields["payload_ids"] for r in self.logger.at("warning")
        )

    def latencies(self, acked: dict[str, float]) -> list[float]:
        wait_until(lambda: acked.keys() <= self.landed.keys(), 30, "every healthy entry in the destination")
        return sorted(self.landed[pid] - at for pid, at in acked.items())

    def stop(self) -> None:
        self._watcher.kill()
        self.service.shutdown(5)


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    env = {
        "NEXUS_DATA_DIR": str(tmp_path),
        "NEXUS_TOKEN": TOKEN,
        "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN,
        "NEXUS_QUEUE_WORKERS": str(WORKERS),
        "NEXUS_INITIAL_BACKOFF": str(INITIAL_BACKOFF),
        "NEXUS_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    logger = RecordingLogger()
    service = lifecycle.assemble(load_settings(env), logger)
    service.start()
    assert service.wait_ready(10)
    node = Running(service, logger)
    # The destination's table exists once the service probed it at start.
    with sqlite3.connect(node.db_path, isolation_level=None) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON nexus_entries "
            f"WHEN NEW.payload LIKE '%{MARKER}%' BEGIN SELECT RAISE(ABORT, 'poison refused'); END"
        )
    yield node
    node.stop()


class TestPoisonIsolation:
    """Entries a destination refuses retry on their schedule without holding up healthy ones."""

    def test_healthy_latency_holds_while_poison_entries_retry_and_each_ends_after_max_attempts(
        self, running: Running
    ) -> None:
        """Healthy p99 stays far below one backoff while poison retries; each poison ends after exactly 3 writes."""
        # Given: poison entries, more of them than delivery greenlets, each one written
        # once the one before has failed (so each would hold a greenlet of its own)
        poison: list[str] = []
        for i in range(POISON_ENTRIES):
            payload_id, _ = running.write({"marker": MARKER, "n": i})
            poison.append(payload_id)
            wait_until(functools.partial(running.has_failed, payload_id), 15, "the poison entry's first attempt")
        # When: healthy writes flow through their whole retry schedule
        acked: dict[str, float] = {}
        for i in range(HEALTHY_WRITES):
            payload_id, at = running.write({"healthy": i})
            acked[payload_id] = at
            gevent.sleep(PACE)
        # Then: healthy entries were delivered at their normal pace
        latencies = running.latencies(acked)
        shown = f"p50 {latencies[len(latencies) // 2]:.3f} s, p99 {p99(latencies):.3f} s"
        assert p99(latencies) < HEALTHY_P99_BOUND, shown
        # ... and every poison entry is a dead letter after exactly MAX_ATTEMPTS attempts, one write each
        store = running.service.dead_letters
        wait_until(lambda: all(store.get(pid) is not None for pid in poison), 30, "every poison entry dead-lettered")
        for pid in poison:
            letter = store.get(pid)
            assert letter is not None
            assert letter.attempts == MAX_ATTEMPTS
            writes = [
                r.fields["attempt"]
                for r in running.logger.at("warning")
                if r.event == "delivery_failed" and pid in r.fields["payload_ids"]
            ]
            assert writes == list(range(1, MAX_ATTEMPTS + 1))
        assert not (set(poison) & running.landed.keys())
