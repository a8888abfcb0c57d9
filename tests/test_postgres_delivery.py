"""Delivery to PostgreSQL end to end: outages (contract promise 3), isolation (promise 4), poison entries.

The gunicorn tests run the real service against a private PostgreSQL server that the
test stops and starts (`managed_postgres`), write through real HTTP connections from
OS threads, and check the destination row by row with a psycopg connection of their
own: every acknowledged entry (a 202, or a 429 carrying a payload_id) stored exactly
once, nothing the client did not send, and no dead letter made by the outage.
The poison-entry test runs one worker's service in-process, which is faster.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import json
import signal
import sqlite3
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import falcon.testing
import gevent  # type: ignore[import-untyped, unused-ignore]
import psycopg
import pytest

from nexus_gevent import lifecycle
from nexus_gevent.backlog import Backlog
from nexus_gevent.config import load_settings
from nexus_gevent.http.app import create_app
from nexus_gevent.queue import Queue, QueueConfig
from nexus_gevent.testing import (
    RecordingDestination,
    RecordingLogger,
    RecordingUpdater,
    make_entry,
    wait_until,
)
from tests.support.config_toml import config_toml, destination_table, source_table
from tests.support.proc import (
    ADMIN_TOKEN,
    HOST,
    TOKEN,
    Gunicorn,
    KeepAlive,
    Launcher,
    Ledger,
    Writers,
    admin_headers,
    exactly_once_problems,
    exchange,
    pg_markers,
    post_headers,
    row_problems,
    wait_for,
)

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

# postgres_server, postgres_db_url and managed_postgres come from there.
pytest_plugins = ["tests.support.postgres"]

#: How long PostgreSQL stays down in the outage test, while writes keep flowing.
OUTAGE_SECONDS = 10.0
#: Small retry settings: an outage misread as the entries' fault would dead-letter them
#: within a second (3 attempts, 0.1 + 0.2 s of backoff).
FAST_RETRIES = {"NEXUS_MAX_ATTEMPTS": "3", "NEXUS_INITIAL_BACKOFF": "0.1"}
#: Far above the few seconds a healthy service needs to deliver what piled up in an outage.
DELIVERY_DEADLINE = 60.0
#: The pooled connections come back within the probe's backoff cap (5 s) plus a connect.
RECOVERY_DEADLINE = 30.0
WRITER_THREADS = 4
#: Writes to the SQLite destination timed in each phase of the isolation test.
TIMED_WRITES = 100
#: Every write to the SQLite destination is stored within this while PostgreSQL is down.
ISOLATED_DELIVERY_BOUND = 2.0
#: The entries a CHECK constraint on nexus_entries refuses (SQLSTATE 23514), as a
#: destination-side rule the service cannot know at ingest.
POISON_BODY = b'{"poison": true}'
#: JSON texts that JSON allows but JSONB can never hold: ingest refuses them for PostgreSQL.
UNSTORABLE_BODIES = {
    "nul-in-a-value": b'{"a": "x\\u0000y"}',
    "nul-as-a-key": b'{"\\u0000": 1}',
    "scale-past-16383": b'{"a": 1e-20000}',
}

# -- reading PostgreSQL ----------------------------------------------------------------


def pg_ids(url: str) -> set[str]:
    """The payload_ids stored so far; empty while the server cannot be reached."""
    try:
        return {pid for pid, _ in pg_markers(url)}
    except psycopg.OperationalError:
        return set()


def wait_pg_delivered(url: str, payload_ids: set[str], what: str) -> None:
    """Poll PostgreSQL until every one of `payload_ids` is a row."""
    wait_for(
        lambda: payload_ids <= pg_ids(url),
        DELIVERY_DEADLINE,
        f"{len(payload_ids)} {what} in PostgreSQL",
        describe=lambda: f"still missing: {len(payload_ids - pg_ids(url))}",
    )


def pg_problems(ledger: Ledger, url: str) -> list[str]:
    """Breaches of "each acknowledged entry stored exactly once, and nothing else stored"."""
    return row_problems(ledger, pg_markers(url), responses_may_be_lost=False)


def assert_exactly_once(ledger: Ledger, url: str, server: Gunicorn) -> None:
    problems = pg_problems(ledger, url)
    assert problems == [], (
        f"{len(problems)} problem(s), first ones: {problems[:20]}\noutcomes: {dict(ledger.outcomes)}\n"
        f"log tail:\n{server.log_tail()}"
    )


# -- dead letters -----------------------------------------------------------------------


def listed_dead_letters(port: int) -> list[dict[str, Any]]:
    """GET /admin/dead-letters (the store is shared by every worker of the data dir)."""
    response = exchange(port, "GET", "/admin/dead-letters?limit=1000", headers=admin_headers())
    assert response.status == 200, response.body
    letters: list[dict[str, Any]] = response.json()["dead_letters"]
    return letters


def stored_dead_letters(data_dir: Path) -> int:
    """Rows of dead-letters.db, read after the service stopped; 0 when the file was never made."""
    path = data_dir / "dead-letters.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def assert_no_dead_letters(server: Gunicorn) -> None:
    """None listed by the admin API, none logged, and no healthy entry used up even one attempt.

    The last check is the sharp one: a PoolTimeout takes 5 s, so an outage misread as the
    entries' fault costs each entry one attempt per 5 s, too slow to make dead letters
    within a 10 s outage; but every such attempt is logged as delivery_failed.
    """
    assert listed_dead_letters(server.port) == [], server.log_tail()
    assert server.events("entry_dead_lettered") == [], server.log_tail()
    failed = server.events("delivery_failed")
    assert failed == [], f"{len(failed)} delivery_failed, first: {failed[:3]}"


# -- /ready, watched while PostgreSQL goes down and comes back --------------------------


class LoopThread:
    """A daemon thread running `_run` for the length of a `with` block; `_stop` is set when the block ends."""

    def __init__(self, name: str, *, join_timeout: float) -> None:
        self._stop = threading.Event()
        self._join_timeout = join_timeout
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._join_timeout)

    def _run(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class ReadyLook:
    at: float
    status: int
    reasons: tuple[str, ...]


class ReadyWatcher(LoopThread):
    """A thread asking GET /ready on fresh connections (so any worker may answer) and keeping every answer."""

    def __init__(self, port: int) -> None:
        super().__init__("ready-watcher", join_timeout=10)
        self._port = port
        self._looks: list[ReadyLook] = []
        self._lock = threading.Lock()

    def looks(self, since: float = 0.0, until: float = float("inf")) -> list[ReadyLook]:
        with self._lock:
            return [look for look in self._looks if since <= look.at <= until]

    def saw(self, status: int, reason: str | None = None, *, since: float = 0.0) -> bool:
        return any(look.status == status and (reason is None or reason in look.reasons) for look in self.looks(since))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = exchange(self._port, "GET", "/ready", timeout=5)
            except (OSError, http.client.HTTPException):
                continue
            reasons: tuple[str, ...] = ()
            if response.status != 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    reasons = tuple(response.json()["details"]["reasons"])
            with self._lock:
                self._looks.append(ReadyLook(time.monotonic(), response.status, reasons))
            # A pace, not a synchronisation: a few dozen looks per second are plenty.
            self._stop.wait(0.05)


# -- writing to one named source ----------------------------------------------------------


class SourceWriter(LoopThread):
    """One thread POSTing {"n": <int>} to one source over a keep-alive connection, at a modest pace."""

    def __init__(self, port: int, source: str, token: str, *, first: int, pause: float = 0.005) -> None:
        super().__init__(f"writer-{source}", join_timeout=30)
        self.ledger = Ledger()
        self.statuses: list[tuple[float, int]] = []
        self._port = port
        self._path = f"/inbound/{source}"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._numbers = itertools.count(first)
        self._pause = pause

    def statuses_between(self, since: float, until: float) -> list[int]:
        return [status for at, status in list(self.statuses) if since <= at <= until]

    def _run(self) -> None:
        with contextlib.closing(KeepAlive(self._port)) as client:
            while not self._stop.is_set():
                n = next(self._numbers)
                self.ledger.record_sent(n)
                try:
                    response = client.post(self._path, json.dumps({"n": n}).encode(), self._headers)
                except (OSError, http.client.HTTPException) as exc:
                    self.ledger.record_lost(n, exc)
                    continue
                self.ledger.record_response(n, response.status, response.body)
                self.statuses.append((time.monotonic(), response.status))
                self._stop.wait(self._pause)


def sqlite_has(conn: sqlite3.Connection, payload_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM nexus_entries WHERE payload_id = ?", (payload_id,)).fetchone()
    return row is not None


def timed_writes(port: int, path: str, token: str, db_path: Path, *, ledger: Ledger, numbers: range) -> list[float]:
    """Write each entry, then poll SQLite until its row is there; the seconds from 202 to the row, per write."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    delays: list[float] = []
    conn = http.client.HTTPConnection(HOST, port, timeout=15)
    db = sqlite3.connect(db_path, timeout=10)
    try:
        for n in numbers:
            ledger.record_sent(n)
            response = exchange(port, "POST", path, json.dumps({"n": n}).encode(), headers, conn=conn)
            ledger.record_response(n, response.status, response.body)
            assert response.status == 202, response.body
            payload_id: str = response.json()["payload_id"]
            accepted = time.monotonic()
            wait_for(functools.partial(sqlite_has, db, payload_id), 30, f"row {payload_id} (n={n})", interval=0.002)
            delays.append(time.monotonic() - accepted)
    finally:
        db.close()
        conn.close()
    return delays


def admin_status(port: int) -> dict[str, Any]:
    response = exchange(port, "GET", "/admin/status", headers=admin_headers())
    assert response.status == 200, response.body
    status: dict[str, Any] = response.json()
    return status


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.process
class TestOutage:
    """PostgreSQL stopped under load: delivery pauses and resumes, and no healthy entry is dead-lettered."""

    def test_outage_under_load_pauses_delivery_then_stores_every_ack_once_without_dead_letters(
        self, launch: Launcher, postgres_db_url: str, managed_postgres: PostgresServer
    ) -> None:
        """PostgreSQL down 10 s under writes, 2 workers: /ready 503 then 200, acks stored once, no dead letter."""
        # Given two workers delivering to PostgreSQL, with retries that would dead-letter an entry within a second
        server = launch(workers=2, env={"NEXUS_DESTINATION_URL": postgres_db_url, **FAST_RETRIES})
        server.wait_ready()
        with ReadyWatcher(server.port) as ready, Writers(server.port, threads=WRITER_THREADS) as writers:
            writers.wait_acked(300)
            # When PostgreSQL stops (fast mode: sessions are terminated) while the writes go on ...
            managed_postgres.stop("fast")
            down_at = time.monotonic()
            acked_at_stop = writers.ledger.acked_count
            wait_for(
                lambda: ready.saw(503, "destination_unavailable:default", since=down_at),
                OUTAGE_SECONDS,
                "/ready to report the outage while PostgreSQL is down",
                describe=server.log_tail,
            )
            # ... stays down for OUTAGE_SECONDS, writes still being acknowledged ...
            wait_for(
                lambda: time.monotonic() >= down_at + OUTAGE_SECONDS and writers.ledger.acked_count > acked_at_stop,
                OUTAGE_SECONDS + 5,
                "the end of the outage, with writes acknowledged during it",
                describe=lambda: f"outcomes: {dict(writers.ledger.outcomes)}",
            )
            acked_during_outage = writers.ledger.acked_count - acked_at_stop
            # ... and comes back, while writes keep flowing a while longer
            managed_postgres.start()
            up_at = time.monotonic()
            wait_for(lambda: ready.saw(200, since=up_at), RECOVERY_DEADLINE, "/ready 200 after the outage")
            writers.wait_acked(writers.ledger.acked_count + 300)
        # Then every acknowledged entry reaches PostgreSQL without a restart of the service
        wait_pg_delivered(postgres_db_url, set(writers.ledger.snapshot_acked()), "acknowledged entries")
        # ... the outage made no dead letter
        assert_no_dead_letters(server)
        code, _ = server.stop(signal.SIGTERM)
        assert code == 0, server.log_tail()
        assert stored_dead_letters(server.data_dir) == 0
        # ... each acknowledged entry is exactly one row, and no row was never sent
        assert_exactly_once(writers.ledger, postgres_db_url, server)
        # ... writes were accepted all through the outage, and /ready said why it was not ready
        assert acked_during_outage > 0
        during = ready.looks(down_at, up_at)
        assert any(look.status == 503 and "destination_unavailable:default" in look.reasons for look in during), during[
            :20
        ]
        assert server.events("destination_available"), server.log_tail()

    def test_outage_accepts_writes_while_the_queue_has_room_then_sheds_durably_and_delivers_all(
        self, launch: Launcher, postgres_db_url: str, managed_postgres: PostgresServer
    ) -> None:
        """Queue of 50, PostgreSQL down: 202 until it is full, then 429 with payload_id; all stored once after."""
        # Given one worker with a queue of 50 entries delivering to PostgreSQL, which is stopped
        # (no linger: each delivery greenlet takes the first entry that reaches it, and is
        # then held by the outage; with one, a greenlet could empty the full queue once)
        env = {"NEXUS_DESTINATION_URL": postgres_db_url, "NEXUS_QUEUE_SIZE": "50", "NEXUS_DELIVERY_LINGER": "0"}
        server = launch(workers=1, env={**env, **FAST_RETRIES})
        server.wait_ready()
        worker = server.worker_pids()
        managed_postgres.stop("fast")
        # When one client writes until the service sheds (at most 2,000 writes)
        ledger = Ledger()
        answers: list[tuple[int, float]] = []
        shed: list[dict[str, Any]] = []
        conn = http.client.HTTPConnection(HOST, server.port, timeout=15)
        try:
            for n in range(2000):
                ledger.record_sent(n)
                started = time.monotonic()
                response = exchange(
                    server.port, "POST", "/inbound/default", json.dumps({"n": n}).encode(), post_headers(), conn=conn
                )
                answers.append((response.status, time.monotonic() - started))
                ledger.record_response(n, response.status, response.body)
                if response.status == 429:
                    assert int(response.headers["retry-after"]) >= 1
                    shed.append(response.json())
                    # A few more after the first: the queue stays full while PostgreSQL is down
                    if len(shed) == 20:
                        break
        finally:
            conn.close()
        # Then every write before the first 429 was accepted (202), quickly, at least a queue's worth of them
        statuses = [status for status, _ in answers]
        assert 429 in statuses, f"never shed: {dict(ledger.outcomes)}"
        first_shed = statuses.index(429)
        assert set(statuses[:first_shed]) == {202}, dict(ledger.outcomes)
        assert first_shed >= 50, first_shed
        slowest = max(seconds for status, seconds in answers if status == 202)
        assert slowest < 2.0, f"a 202 took {slowest:.2f} s during the outage"
        # ... and every 429 is the durable kind: it carries the payload_id of an entry already in the WAL
        assert all(body["error"] == "queue_full" and isinstance(body.get("payload_id"), str) for body in shed), shed
        assert set(statuses[first_shed:]) == {429}, dict(ledger.outcomes)
        # When PostgreSQL comes back
        managed_postgres.start()
        # Then every acknowledged entry (202 and 429) is delivered by the same worker, without a restart
        wait_pg_delivered(postgres_db_url, set(ledger.snapshot_acked()), "acknowledged entries (202 and 429)")
        assert server.worker_pids() == worker
        assert_no_dead_letters(server)
        code, _ = server.stop(signal.SIGTERM)
        assert code == 0, server.log_tail()
        assert_exactly_once(ledger, postgres_db_url, server)


LITE_TOKEN = "delivery-test-lite-token"
PG_TOKEN = "delivery-test-pg-token"


def two_destinations_toml(postgres_url: str, lite_db: Path) -> str:
    return config_toml(
        destination_table("pg", postgres_url),
        destination_table("lite", f"sqlite:///{lite_db}"),
        source_table("to_pg", token=PG_TOKEN, destination="pg"),
        source_table("to_lite", token=LITE_TOKEN, destination="lite"),
    )


@pytest.mark.postgres
@pytest.mark.process
class TestIsolation:
    """One destination's outage does not hold back another destination's deliveries (contract promise 4)."""

    def test_sqlite_destination_keeps_its_pace_while_postgres_is_down(
        self, launch: Launcher, tmp_path: Path, postgres_db_url: str, managed_postgres: PostgresServer
    ) -> None:
        """With "pg" down, each "lite" write is stored within 2 s, near its usual pace; "pg" writes get 202 and wait."""
        # Given one worker with two destinations, PostgreSQL "pg" and SQLite "lite", each with a source
        lite_db = tmp_path / "lite.db"
        config = tmp_path / "nexus.toml"
        config.write_text(two_destinations_toml(postgres_db_url, lite_db))
        server = launch(workers=1, env={"NEXUS_CONFIG": str(config), **FAST_RETRIES})
        server.wait_ready()
        lite = Ledger()
        with ReadyWatcher(server.port) as ready, SourceWriter(server.port, "to_pg", PG_TOKEN, first=1_000_000) as pg:
            # ... and "pg" taking a steady stream of writes all along
            wait_for(lambda: pg.ledger.acked_count >= 50, 10, "writes to pg")
            # When 100 writes to "lite" are timed from 202 to their row, first with PostgreSQL up
            path = "/inbound/to_lite"
            up = timed_writes(server.port, path, LITE_TOKEN, lite_db, ledger=lite, numbers=range(TIMED_WRITES))
            # ... then with PostgreSQL stopped: first while "pg" deliveries wait for a connection,
            # then (another 100) once the service has paused "pg" and probes it
            managed_postgres.stop("fast")
            down_at = time.monotonic()
            waiting = timed_writes(
                server.port, path, LITE_TOKEN, lite_db, ledger=lite, numbers=range(TIMED_WRITES, 2 * TIMED_WRITES)
            )
            wait_for(
                lambda: ready.saw(503, "destination_unavailable:pg", since=down_at),
                15,
                "/ready to report pg unavailable",
                describe=server.log_tail,
            )
            paused = timed_writes(
                server.port, path, LITE_TOKEN, lite_db, ledger=lite, numbers=range(2 * TIMED_WRITES, 3 * TIMED_WRITES)
            )
            status = admin_status(server.port)
            down_until = time.monotonic()
            pg_statuses_down = pg.statuses_between(down_at, down_until)
            managed_postgres.start()
        # Then every write to "lite" during the outage was stored within the bound, near its normal pace
        timing = ", ".join(
            f"{phase}: p50 {statistics.median(delays) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms"
            for phase, delays in (("up", up), ("pg waiting", waiting), ("pg paused", paused))
        )
        for delays in (waiting, paused):
            assert max(delays) < ISOLATED_DELIVERY_BOUND, timing
            assert statistics.median(delays) < 5 * statistics.median(up) + 0.2, timing
        # ... while "pg" writes were still accepted as durable (202) and held for later
        assert pg_statuses_down, "no write to pg during the outage"
        assert set(pg_statuses_down) == {202}, pg.ledger.outcomes
        assert status["destinations"]["pg"]["available"] is False, status
        assert status["destinations"]["lite"]["available"] is True, status
        assert status["destinations"]["pg"]["queue_depth"] + status["destinations"]["pg"]["backlog"] > 0, status
        assert status["wal"]["pending"] >= len(pg_statuses_down), status
        assert not any("destination_unavailable:lite" in look.reasons for look in ready.looks()), timing
        # ... and once PostgreSQL is back, every acknowledged entry of both is stored exactly once
        wait_pg_delivered(postgres_db_url, set(pg.ledger.snapshot_acked()), "writes to pg")
        assert_no_dead_letters(server)
        code, _ = server.stop(signal.SIGTERM)
        assert code == 0, server.log_tail()
        assert_exactly_once(pg.ledger, postgres_db_url, server)
        assert exactly_once_problems(lite, lite_db, responses_may_be_lost=False) == []
        print(f"\nisolation: {timing}")


def in_process_env(tmp_path: Path, postgres_url: str, **extra: str) -> dict[str, str]:
    """The environment of one worker's service run in-process on `postgres_url`."""
    return {
        "NEXUS_DATA_DIR": str(tmp_path / "data"),
        "NEXUS_TOKEN": TOKEN,
        "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN,
        "NEXUS_DESTINATION_URL": postgres_url,
        **extra,
    }


@pytest.mark.postgres
class TestPoisonEntry:
    """An entry PostgreSQL refuses uses up its attempts alone; its neighbours go straight through."""

    def test_entry_postgres_refuses_is_dead_lettered_after_max_attempts_and_neighbours_are_stored_once(
        self, tmp_path: Path, postgres_db_url: str
    ) -> None:
        """An entry a CHECK constraint refuses, amid 100 others: dead letter after 3 writes; the 100 stored once."""
        # Given one worker's service (in-process) delivering to PostgreSQL with 3 attempts
        env = in_process_env(tmp_path, postgres_db_url, NEXUS_MAX_ATTEMPTS="3", NEXUS_INITIAL_BACKOFF="0.05")
        logger = RecordingLogger()
        service = lifecycle.assemble(load_settings(env), logger)
        service.start()
        try:
            assert service.wait_ready(10)
            # The table exists once the service probed PostgreSQL at start.
            with psycopg.connect(postgres_db_url, autocommit=True) as conn:
                conn.execute("ALTER TABLE nexus_entries ADD CONSTRAINT no_poison CHECK (NOT payload ? 'poison')")
            client = falcon.testing.TestClient(create_app(service, logger))
            bodies = [json.dumps({"n": n}).encode() for n in range(50)]
            bodies += [POISON_BODY] + [json.dumps({"n": n}).encode() for n in range(50, 100)]
            results: dict[int, falcon.testing.Result] = {}

            def post(i: int, body: bytes) -> None:
                results[i] = client.simulate_post("/inbound/default", body=body, headers=post_headers())

            # When they are written at the same time (they share WAL commits and delivery batches)
            gevent.joinall([gevent.spawn(post, i, body) for i, body in enumerate(bodies)], timeout=30, raise_error=True)
            assert sorted(r.status_code for r in results.values()) == [202] * len(bodies)
            ids = {i: str(results[i].json["payload_id"]) for i in results}
            poison = ids.pop(50)
            # Then the poison entry becomes a dead letter after exactly 3 attempts, with its last error ...
            dead_letters = service.dead_letters
            assert dead_letters is not None
            wait_until(lambda: dead_letters.count() == 1, 20, "the poison entry dead-lettered")
            listed = client.simulate_get("/admin/dead-letters", headers=admin_headers())
            assert listed.status_code == 200, listed.text
            [letter] = listed.json["dead_letters"]
            assert letter["payload_id"] == poison
            assert letter["attempts"] == 3
            assert "no_poison" in letter["last_error"], letter
            # ... while its 100 neighbours are stored, each once, and the poison is not
            wait_until(lambda: set(ids.values()) <= pg_ids(postgres_db_url), 20, "the neighbours delivered")
            rows = pg_markers(postgres_db_url)
            assert sorted(n if n is not None else -1 for _, n in rows) == list(range(100))
            assert {pid for pid, _ in rows} == set(ids.values())
            # ... and nothing is left PENDING in the WAL
            wal = service.wal
            assert wal is not None
            wait_until(lambda: wal.pending_count == 0, 5, "every entry settled")
            failures = [r.fields for r in logger.at("warning") if r.event == "delivery_failed"]
            # ... after the poison failed in a batch with its neighbours (its first attempt), which
            # was split at once: then it was written alone twice
            assert any(f["entries"] > 1 and f["attempt"] == 1 for f in failures), failures
            assert [f["attempt"] for f in failures if f["entries"] == 1] == [2, 3], failures
        finally:
            service.shutdown(10)


@pytest.mark.postgres
class TestUnstorableAtIngest:
    """What JSONB can never hold is refused at ingest for a PostgreSQL destination, not dead-lettered later."""

    @pytest.mark.parametrize("body", UNSTORABLE_BODIES.values(), ids=UNSTORABLE_BODIES.keys())
    def test_a_body_jsonb_cannot_hold_is_400_with_the_reason_and_nothing_is_stored(
        self, tmp_path: Path, postgres_db_url: str, body: bytes
    ) -> None:
        """NUL in a string or key, or a scale past 16383 digits: 400 invalid_body naming why; nothing in the WAL."""
        env = in_process_env(tmp_path, postgres_db_url)
        logger = RecordingLogger()
        service = lifecycle.assemble(load_settings(env), logger)
        service.start()
        try:
            assert service.wait_ready(10)
            client = falcon.testing.TestClient(create_app(service, logger))
            result = client.simulate_post("/inbound/default", body=body, headers=post_headers())
            assert result.status_code == 400, result.text
            assert result.json["error"] == "invalid_body"
            assert "PostgreSQL" in result.json["message"]
            assert service.wal.pending_count == 0
        finally:
            service.shutdown(10)

    def test_a_batch_with_one_element_jsonb_cannot_hold_is_refused_whole(
        self, tmp_path: Path, postgres_db_url: str
    ) -> None:
        """An NDJSON batch whose third element holds a NUL: 400 naming index 2 and PostgreSQL; nothing of it stored."""
        logger = RecordingLogger()
        service = lifecycle.assemble(load_settings(in_process_env(tmp_path, postgres_db_url)), logger)
        service.start()
        try:
            assert service.wait_ready(10)
            client = falcon.testing.TestClient(create_app(service, logger))
            body = b'{"n": 0}\n{"n": 1}\n' + UNSTORABLE_BODIES["nul-in-a-value"] + b'\n{"n": 3}\n'
            headers = {**post_headers(), "Content-Type": "application/x-ndjson"}
            result = client.simulate_post("/inbound/default", body=body, headers=headers)
            assert result.status_code == 400, result.text
            assert result.json["details"]["index"] == 2
            assert "PostgreSQL" in result.json["message"]
            assert service.wal.pending_count == 0
        finally:
            service.shutdown(10)


class TestBacklogFeeding:
    """A large backlog (a restart after an outage, bench/delivery.py) is fed into the queue without stalling the hub."""

    def test_feeding_a_backlog_of_90k_entries_never_stalls_the_hub_for_long(self) -> None:
        """90,000 entries waiting behind a full queue of 10,000 are fed in without blocking other greenlets 0.15 s."""
        # Given a backlog whose queue of 10,000 is full and whose backlog holds 90,000 more
        destination = RecordingDestination()
        queue = Queue(QueueConfig(size=10_000, workers=4), RecordingLogger(), destination, RecordingUpdater())
        backlog = Backlog(queue, RecordingLogger())
        try:
            for _ in range(100_000):
                backlog.offer(make_entry(destination=backlog.name))
            assert (queue.depth, backlog.waiting) == (10_000, 90_000)
            gaps: list[float] = []

            def ticker() -> None:
                last = time.monotonic()
                while True:
                    gevent.sleep(0.005)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            # When the delivery greenlets and the feeder run until everything is delivered
            tick = gevent.spawn(ticker)
            wait_until(lambda: backlog.waiting == 0 and queue.depth == 0, 30, "the backlog fed and delivered")
            tick.kill()
            # Then no step of the feeder held the hub long (taking the oldest entry used to
            # rescan every slot freed before it: O(N^2), half a second per step at 90k)
            assert max(gaps) < 0.15, f"the hub was blocked for {max(gaps):.3f} s"
            assert sum(len(call.payload_ids) for call in destination.calls) == 100_000
        finally:
            backlog.stop()
            assert queue.drain(5)
