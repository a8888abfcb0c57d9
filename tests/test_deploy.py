"""The production process model: real gunicorn behind a real nginx run from deploy/nginx.conf.

Writes go through nginx to gunicorn's gevent workers; a full queue is forced by holding
SQLite's write lock on the destination from the test, so delivery pauses while writes
keep arriving. Scaling is tested both ways: down (fewer workers than WAL directories
after a crash) and out (two instances behind one nginx upstream, one PostgreSQL).
"""

from __future__ import annotations

import re
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.proc import (
    SMALL_QUEUE,
    Launcher,
    Ledger,
    Response,
    Writers,
    admin_headers,
    assert_exactly_once,
    count_rows,
    exchange,
    metric_sum,
    pg_markers,
    post_headers,
    ready,
    row_problems,
    scrape,
    stored_markers,
    wait_delivered,
    wait_for,
)
from tests.support.proc import (
    destination_locked as locked,
)

if TYPE_CHECKING:
    from tests.support.nginx import LaunchNginx

# The fixtures `nginx` and `postgres_db_url` come from these plugins.
pytest_plugins = ["tests.support.nginx", "tests.support.postgres"]
pytestmark = pytest.mark.process

PAYLOAD_ID = re.compile(r"[0-9a-f]{32}")
#: NEXUS_MAX_BODY_BYTES's default, and nginx's client_max_body_size 1m.
MAX_BODY = 1_048_576
#: Writes sent while the destination is locked: several times what the queues hold.
LOCKED_WRITES = 60
#: Writes a test sends, at most, looking for the first 429.
MAX_WRITES_TO_FILL = 40
#: The single worker adopts orphans every 10 s (service.ADOPT_INTERVAL); generous on top.
ADOPTION_DEADLINE = 60.0


def post(port: int, n: int, *, request_id: str | None = None, extra: str = "") -> Response:
    """POST {"n": n, ...} on a fresh connection."""
    headers = post_headers()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return exchange(port, "POST", "/inbound/default", f'{{"n": {n}{extra}}}'.encode(), headers)


def record(ledger: Ledger, n: int, response: Response) -> Response:
    ledger.record_sent(n)
    ledger.record_response(n, response.status, response.body)
    return response


def write_until_shed(port: int, ledger: Ledger, first: int = 0) -> tuple[int, Response, str]:
    """Write one entry at a time until one gets 429; (its marker, the 429, the X-Request-Id it was sent with)."""
    for n in range(first, first + MAX_WRITES_TO_FILL):
        request_id = f"fill-{n}-{uuid.uuid4().hex}"
        response = record(ledger, n, post(port, n, request_id=request_id))
        if response.status == 429:
            return n, response, request_id
        assert response.status == 202, response
    raise AssertionError(f"no 429 within {MAX_WRITES_TO_FILL} writes: {dict(ledger.outcomes)}")


@pytest.mark.nginx
class TestThroughNginx:
    """nginx from deploy/nginx.conf in front of gunicorn with two workers."""

    def test_writes_through_nginx_are_accepted_and_keep_the_client_request_id(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """A write through nginx gets 202 and a payload_id; the client's X-Request-Id reaches the service and back."""
        # Given two workers behind nginx
        server = ready(launch())
        proxy = nginx([server.port])
        ledger = Ledger()
        # When a client writes with its own X-Request-Id, and without one
        request_id = f"deploy-{uuid.uuid4().hex}"
        given = record(ledger, 0, post(proxy.port, 0, request_id=request_id))
        generated = record(ledger, 1, post(proxy.port, 1))
        # Then both are accepted with a payload_id ...
        for response in (given, generated):
            assert response.status == 202, response
            assert PAYLOAD_ID.fullmatch(response.json()["payload_id"]), response
            assert response.json()["status"] == "accepted"
        # ... the client's id comes back unchanged, and one is made up (by nginx) for the other
        assert given.headers["x-request-id"] == request_id
        assert generated.headers.get("x-request-id"), generated.headers
        # ... the service logged the client's id with that write
        lines = wait_for(
            lambda: [r for r in server.events("request") if r.get("request_id") == request_id],
            10,
            "the service's request line",
            describe=server.log_tail,
        )
        assert lines[0]["payload_id"] == given.json()["payload_id"]
        assert lines[0]["status"] == 202
        # ... and both entries are delivered, once
        wait_delivered(server.db_path, ledger.snapshot_acked(), timeout=30)
        assert_exactly_once(ledger, server)

    def test_nginx_refuses_a_body_over_one_mebibyte_with_413_and_passes_one_of_exactly_one_mebibyte(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """A body of 1 MiB + 1 byte gets nginx's own 413 page (it never reaches the service); exactly 1 MiB gets 202."""
        # Given two workers behind nginx, both at the default NEXUS_MAX_BODY_BYTES
        server = ready(launch())
        proxy = nginx([server.port])
        prefix, suffix = b'{"n": 1, "pad": "', b'"}'
        at_limit = prefix + b"x" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
        over_limit = prefix + b"x" * (MAX_BODY + 1 - len(prefix) - len(suffix)) + suffix
        assert (len(at_limit), len(over_limit)) == (MAX_BODY, MAX_BODY + 1)
        # When one body over the limit and one at the limit are sent through nginx
        refused = exchange(proxy.port, "POST", "/inbound/default", over_limit, post_headers(), timeout=30)
        passed = exchange(proxy.port, "POST", "/inbound/default", at_limit, post_headers(), timeout=30)
        # Then nginx answers the first itself (its HTML page, not the service's JSON) ...
        assert refused.status == 413, refused
        assert b"413" in refused.body
        assert not refused.headers.get("content-type", "").startswith("application/json")
        # ... and the second is the service's 202, delivered
        assert passed.status == 202, passed
        payload_id = passed.json()["payload_id"]
        wait_delivered(server.db_path, [payload_id], timeout=30)
        # ... while the service never saw a 413 (nginx refused before the body crossed)
        assert [r for r in server.events("request") if r.get("status") == 413] == []


@pytest.mark.nginx
class TestLoadSheddingThroughNginx:
    """A full queue (destination locked, NEXUS_QUEUE_SIZE=5): what the client sees through nginx."""

    def test_full_queue_answers_429_with_retry_after_through_nginx_unchanged(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """A full queue's 429 reaches the client through nginx with its Retry-After, JSON body and payload_id intact."""
        # Given two workers with tiny queues behind nginx, and a destination that is locked
        server = ready(launch(env=SMALL_QUEUE))
        proxy = nginx([server.port])
        ledger = Ledger()
        with locked(server.db_path):
            # When writes continue until a queue is full
            _, shed, request_id = write_until_shed(proxy.port, ledger)
        # Then the client gets the service's 429, header and body agreeing ...
        body = shed.json()
        assert body["error"] == "queue_full"
        assert set(body) >= {"error", "message", "details", "retry_after_seconds", "payload_id"}
        assert shed.headers["retry-after"].isdigit(), shed.headers
        assert int(shed.headers["retry-after"]) == body["retry_after_seconds"] >= 1
        # ... and, under the durable policy, the payload_id of the stored entry
        assert PAYLOAD_ID.fullmatch(body["payload_id"])
        assert body["details"]["durable"] is True
        # ... exactly as the service answered it (same request id, status and payload_id in its log)
        assert shed.headers["x-request-id"] == request_id
        line = wait_for(
            lambda: [r for r in server.events("request") if r.get("request_id") == request_id],
            10,
            "the service's request line",
            describe=server.log_tail,
        )[0]
        assert (line["status"], line["payload_id"]) == (429, body["payload_id"])

    def test_every_durable_429_is_delivered_exactly_once_without_a_restart(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """Every durable 429's payload_id reaches the destination exactly once when it is back, with no restart."""
        # Given two workers with tiny queues behind nginx, and a destination that is locked
        server = ready(launch(env=SMALL_QUEUE))
        proxy = nginx([server.port])
        with locked(server.db_path):
            # When four threads write 60 entries, most of which are shed
            with Writers(proxy.port, threads=4, total=LOCKED_WRITES) as writers:
                writers.join()
            ledger = writers.ledger
            shed = ledger.outcomes["429:queue_full"]
            assert shed > 0, dict(ledger.outcomes)
            # ... each carrying the payload_id of an entry already durable
            assert ledger.outcomes["202"] + shed == ledger.acked_count == LOCKED_WRITES, dict(ledger.outcomes)
            assert count_rows(server.db_path) == {}
            # When the destination comes back (the lock is released)
        # Then every acknowledged entry, 202 or 429, is delivered by the same processes ...
        workers = server.worker_pids()
        wait_delivered(server.db_path, ledger.snapshot_acked(), timeout=60)
        assert server.proc.poll() is None
        assert server.worker_pids() == workers
        assert len(server.events("worker_started")) == 2, server.log_tail()
        # ... exactly once, row by row
        assert_exactly_once(ledger, server)

    def test_retry_after_grows_with_the_backlog(self, launch: Launcher, nginx: LaunchNginx) -> None:
        """With a larger backlog Retry-After advises more seconds than with a smaller one (it is not a constant)."""
        # Given two workers with tiny queues behind nginx, and a destination that is locked
        server = ready(launch(env=SMALL_QUEUE))
        proxy = nginx([server.port])
        ledger = Ledger()
        with locked(server.db_path):
            # When the first 429 comes (the smallest backlog: one entry) ...
            n, first, _ = write_until_shed(proxy.port, ledger)
            small = int(first.headers["retry-after"])
            # ... and 30 more writes pile up behind it
            later = [record(ledger, m, post(proxy.port, m)) for m in range(n + 1, n + 31)]
        # (a worker whose queue still had room answers 202: its backlog is not the one growing)
        advised = [int(r.headers["retry-after"]) for r in later if r.status == 429]
        assert len(advised) >= 20, [r.status for r in later]
        # Then the advice with the larger backlog is at least, and here more than, the first one
        large = max(advised[-5:])
        assert large >= small
        assert large > small, f"first {small}, then {advised}"
        assert all(1 <= a <= 60 for a in [small, *advised])

    def test_reject_policy_answers_429_without_payload_id_and_never_stores_the_rejected_bodies(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """Under NEXUS_SHED_POLICY=reject a 429 carries no payload_id, and its body never reaches the destination."""
        # Given two workers with tiny queues under the reject policy, behind nginx, destination locked
        server = ready(launch(env={**SMALL_QUEUE, "NEXUS_SHED_POLICY": "reject"}))
        proxy = nginx([server.port])
        # When four threads write 60 entries
        with locked(server.db_path), Writers(proxy.port, threads=4, total=LOCKED_WRITES) as writers:
            writers.join()
        ledger = writers.ledger
        rejected = {n for n, outcome in ledger.outcome_of.items() if outcome == "429:queue_full"}
        # Then some got 429, none of them with a payload_id
        assert rejected, dict(ledger.outcomes)
        assert ledger.outcomes["202"] + len(rejected) == LOCKED_WRITES, dict(ledger.outcomes)
        assert ledger.acked_count == len(ledger.answered) == ledger.outcomes["202"]
        # ... and once the destination is back and nothing is pending any more
        wait_delivered(server.db_path, ledger.snapshot_acked(), timeout=60)

        def settled() -> bool:
            text = scrape(proxy.port)
            return all(metric_sum(text, m) == 0 for m in ("nexus_wal_pending_entries", "nexus_backlog_entries"))

        wait_for(settled, 30, "no pending entries (/metrics)", describe=server.log_tail)
        # ... the rejected bodies are nowhere in the destination, and each 202 is stored once
        stored = {n for _, n in stored_markers(server.db_path)}
        assert stored & rejected == set()
        assert_exactly_once(ledger, server)


class TestScaling:
    """Fewer workers than WAL directories, and two instances behind one nginx."""

    def test_scale_down_from_four_workers_to_one_delivers_every_ack_exactly_once(self, launch: Launcher) -> None:
        """kill -9 of 4 workers, restart with WEB_CONCURRENCY=1: w1..w3 are adopted and every ack stored once."""
        # Given four workers under continuous writes
        first = ready(launch(workers=4))
        writers = Writers(first.port, threads=8)
        writers.start()
        try:
            # When the master and every worker are killed with SIGKILL mid-write
            writers.wait_acked(400)
            first.kill9_all()
        finally:
            writers.stop()
        wal_root = first.data_dir / "wal"
        assert sorted(p.name for p in wal_root.iterdir()) == ["w0", "w1", "w2", "w3"]
        # ... and the service comes back with a single worker
        second = launch(workers=1)
        second.wait_ready()
        # Then that worker takes w0 and adopts the three orphaned directories (every 10 s) ...
        wait_for(
            lambda: {Path(e["orphan"]).name for e in second.events("wal_orphan_adopted")} >= {"w1", "w2", "w3"},
            ADOPTION_DEADLINE,
            "w1..w3 to be adopted",
            describe=second.log_tail,
        )
        assert sum(int(e["entries"]) for e in second.events("wal_orphan_adopted")) > 0, second.log_tail()
        # ... delivers every acknowledged entry
        wait_delivered(second.db_path, writers.ledger.snapshot_acked(), timeout=ADOPTION_DEADLINE)
        assert [Path(e["wal_dir"]).name for e in second.events("worker_started")] == ["w0"]
        # ... and /admin/status shows w0 held by the one live worker, the emptied orphans held by no one
        status = exchange(second.port, "GET", "/admin/status", headers=admin_headers()).json()
        held = {d["directory"]: (d["pid"], d["alive"]) for d in status["workers"]}
        assert held == {
            "w0": (status["worker"]["pid"], True),
            **{orphan: (None, False) for orphan in ("w1", "w2", "w3")},
        }, status["workers"]
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0, second.log_tail()
        # ... exactly once; rows without an ack are only requests whose response the kill lost
        assert_exactly_once(writers.ledger, second, responses_may_be_lost=True)
        for orphan in ("w1", "w2", "w3"):
            assert list((wal_root / orphan).glob("seg-*.wal")) == [], f"{orphan} still holds segments"

    @pytest.mark.nginx
    @pytest.mark.postgres
    def test_scale_out_two_instances_behind_one_nginx_store_every_ack_once_in_postgres(
        self, launch: Launcher, nginx: LaunchNginx, postgres_db_url: str, tmp_path: Path
    ) -> None:
        """Two instances behind one nginx upstream, one PostgreSQL: both take writes, every ack is one row."""
        # Given two service instances sharing one PostgreSQL database, behind one nginx upstream
        env = {"NEXUS_DESTINATION_URL": postgres_db_url}
        instances = [launch(env=env, data_dir=tmp_path / name) for name in ("a", "b")]
        for instance in instances:
            instance.wait_ready()
        proxy = nginx([i.port for i in instances])
        # When six threads write 600 entries through nginx
        total = 600
        with Writers(proxy.port, threads=6, total=total) as writers:
            writers.join()
        ledger = writers.ledger
        assert ledger.lost == set(), dict(ledger.outcomes)
        assert ledger.acked_count == total, dict(ledger.outcomes)
        # ... and both instances are stopped with SIGTERM
        for instance in instances:
            instance.send_signal(signal.SIGTERM)
        for instance in instances:
            assert instance.wait_exit() == 0, instance.log_tail()
        # Then both instances took writes, and each write reached exactly one of them
        accepted = [
            len([r for r in i.events("request") if r.get("path") == "/inbound/default" and r.get("status") == 202])
            for i in instances
        ]
        assert all(accepted), accepted
        assert sum(accepted) == total, accepted
        # ... and every acknowledged payload_id is in nexus_entries exactly once, row by row
        markers = pg_markers(postgres_db_url)
        problems = row_problems(ledger, markers, responses_may_be_lost=False)
        assert problems == [], f"{problems[:20]}\noutcomes: {dict(ledger.outcomes)}"
        assert len(markers) == total
