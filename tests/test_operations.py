"""Operations against a real gunicorn with two workers: metrics, logs, status and dead letters.

What an operator relies on at 3 a.m. (docs/operations.md): /metrics sums every worker,
the log shows requests but never a token or a body, /admin/status shows every worker's
WAL directory, and a dead letter can be listed, fixed and retried over HTTP. Delivery
is paused where needed by holding SQLite's write lock on the destination from the test.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.proc import (
    ADMIN_TOKEN,
    SMALL_QUEUE,
    TOKEN,
    Gunicorn,
    Launcher,
    Ledger,
    Response,
    Writers,
    admin_headers,
    assert_exactly_once,
    count_rows,
    exchange,
    metric_sum,
    poisoned,
    post_headers,
    ready,
    scrape,
    wait_delivered,
    wait_for,
)
from tests.support.proc import (
    destination_locked as locked,
)

pytestmark = pytest.mark.process

#: Writes of the counting test, all of which fit in the default queue.
WRITES = 200
#: Worker recycles the recycled-counters test waits for.
RECYCLED = 2
#: Fresh-connection writes, at most, until both workers hold entries.
MAX_FILL_WRITES = 200
POISON = "poison-marker"
#: Two attempts with 50 ms between them, so an entry error becomes a dead letter in well under a second.
DEAD_LETTER_ENV = {"NEXUS_MAX_ATTEMPTS": "2", "NEXUS_INITIAL_BACKOFF": "0.05"}
SOURCE_AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return exchange(port, "POST", "/inbound/default", body, post_headers() if headers is None else headers)


def write(port: int, ledger: Ledger, n: int, extra: str = "") -> Response:
    """POST {"n": n, ...} on a fresh connection and record the answer."""
    ledger.record_sent(n)
    response = post(port, f'{{"n": {n}{extra}}}'.encode())
    ledger.record_response(n, response.status, response.body)
    return response


def metric(port: int, sample: str, **labels: str) -> float:
    return metric_sum(scrape(port), sample, **labels)


def statuses(server: Gunicorn) -> dict[int, Any]:
    """worker pid -> its /admin/status, asked on fresh connections until every worker has answered."""
    pids = set(server.worker_pids())
    seen: dict[int, Any] = {}

    def every_worker_answered() -> bool:
        response = exchange(server.port, "GET", "/admin/status", headers=admin_headers())
        assert response.status == 200, response
        body = response.json()
        seen[body["worker"]["pid"]] = body
        return pids <= seen.keys()

    wait_for(every_worker_answered, 10, f"/admin/status from workers {sorted(pids)}", describe=lambda: str(seen))
    return seen


def write_until_both_workers_hold_entries(server: Gunicorn, ledger: Ledger, at_least: int = 2) -> dict[int, Any]:
    """Write on fresh connections, ten at a time, until each worker's WAL holds `at_least` pending entries."""
    n = 0
    while n < MAX_FILL_WRITES:
        for _ in range(10):
            assert write(server.port, ledger, n).status == 202, dict(ledger.outcomes)
            n += 1
        found = statuses(server)
        if all(s["wal"]["pending"] >= at_least for s in found.values()):
            return found
    raise AssertionError(f"{MAX_FILL_WRITES} writes never reached both workers: {statuses(server)}")


def assert_error_shape(response: Response, status: int, code: str) -> None:
    assert response.status == status, response
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str)
    assert isinstance(body["details"], dict)


class TestMetrics:
    """GET /metrics: Prometheus text summed over both workers, behind the admin token."""

    def test_accepted_and_processed_counters_equal_the_writes_summed_over_workers(self, launch: Launcher) -> None:
        """200 accepted writes give accepted_total 200, then processing_rate_total and the WAL latency count 200."""
        # Given two workers
        server = ready(launch())
        # When eight threads write 200 entries, all accepted
        with Writers(server.port, threads=8, total=WRITES) as writers:
            writers.join()
        assert writers.ledger.outcomes == {"202": WRITES}, dict(writers.ledger.outcomes)
        # Then the accepted counter, summed over both workers' label values, is exactly 200 ...
        text = scrape(server.port)
        assert metric_sum(text, "nexus_writes_accepted_total") == WRITES
        assert metric_sum(text, "nexus_writes_accepted_total", source="default") == WRITES
        # ... to which both workers contributed (segments have no header: bytes in a WAL are records)
        per_worker = statuses(server)
        assert [s["wal"]["size_bytes"] > 0 for s in per_worker.values()] == [True, True], per_worker
        # ... and once everything is delivered, the spec's counter is exactly 200 too
        wait_delivered(server.db_path, writers.ledger.snapshot_acked(), timeout=30)
        wait_for(
            lambda: metric(server.port, "bubblefish_queue_processing_rate_total") == WRITES,
            10,
            f"bubblefish_queue_processing_rate_total == {WRITES}",
            describe=lambda: scrape(server.port),
        )
        text = scrape(server.port)
        assert metric_sum(text, "nexus_delivered_entries_total", destination="default") == WRITES
        assert metric_sum(text, "nexus_writes_shed_total") == 0
        # ... and the WAL append latency histogram, published once a second, counts each write once
        wait_for(
            lambda: metric(server.port, "nexus_wal_append_latency_seconds_count") == WRITES,
            10,
            f"nexus_wal_append_latency_seconds_count == {WRITES}",
            describe=lambda: scrape(server.port),
        )

    def test_counters_keep_the_counts_of_workers_that_recycled(self, launch: Launcher) -> None:
        """Workers recycled every 50 requests: /metrics counts every stored entry as accepted and as delivered."""
        # Given two workers that restart themselves after 50 requests
        server = launch(env={"NEXUS_MAX_REQUESTS": "50"})
        server.wait_ready()
        # When writes go on until at least two workers have recycled (their counts are in dead workers' files)
        with Writers(server.port, threads=8) as writers:
            writers.wait_acked(300)
            wait_for(
                lambda: len(server.events("drain_finished")) >= RECYCLED,
                60,
                f"{RECYCLED} recycled workers",
                describe=server.log_tail,
            )
        wait_delivered(server.db_path, writers.ledger.snapshot_acked(), timeout=30)

        # Then /metrics, summed over live and dead workers, counts every stored entry once as accepted, and as
        # delivered (at least once: a redelivery after a restart is a second delivery of one row)
        seen: list[tuple[float, float, int]] = []

        def counted_as_stored() -> bool:
            text = scrape(server.port)
            accepted = metric_sum(text, "nexus_writes_accepted_total")
            delivered = metric_sum(text, "nexus_delivered_entries_total")
            seen.append((accepted, delivered, len(count_rows(server.db_path))))
            return accepted == seen[-1][2] <= delivered

        wait_for(
            counted_as_stored,
            30,
            "accepted_total == rows stored <= delivered_entries_total",
            describe=lambda: f"(accepted, delivered, rows): {seen[-1:]}",
        )

    def test_shed_counter_equals_the_429s_the_client_saw(self, launch: Launcher) -> None:
        """nexus_writes_shed_total equals the number of 429 answers, and accepted_total the number of 202s."""
        # Given two workers with tiny queues and a locked destination
        server = ready(launch(env=SMALL_QUEUE))
        with locked(server.db_path):
            # When four threads write 60 entries
            with Writers(server.port, threads=4, total=60) as writers:
                writers.join()
            outcomes = writers.ledger.outcomes
            shed, accepted = outcomes["429:queue_full"], outcomes["202"]
            assert shed > 0
            assert shed + accepted == 60, dict(outcomes)
            # Then the counters say what the client saw
            text = scrape(server.port)
            assert metric_sum(text, "nexus_writes_shed_total") == shed
            assert metric_sum(text, "nexus_writes_shed_total", source="default", policy="durable") == shed
            assert metric_sum(text, "nexus_writes_accepted_total") == accepted

    def test_metrics_needs_the_admin_token(self, launch: Launcher) -> None:
        """/metrics answers 401 without a token, 403 with a source's token, 200 with the admin token."""
        # Given two workers
        server = ready(launch())
        # When /metrics is asked without a token, with the source's, and with the admin's
        anonymous = exchange(server.port, "GET", "/metrics")
        source = exchange(server.port, "GET", "/metrics", headers=SOURCE_AUTH)
        admin = exchange(server.port, "GET", "/metrics", headers=admin_headers())
        # Then only the admin gets the text
        assert_error_shape(anonymous, 401, "unauthorized")
        assert_error_shape(source, 403, "admin_only")
        assert admin.status == 200
        assert admin.headers["content-type"].startswith("text/plain")
        assert b"bubblefish_queue_processing_rate_total" in admin.body

    def test_queue_depth_gauge_is_a_live_sum_over_the_workers(self, launch: Launcher) -> None:
        """While delivery is paused, nexus_queue_depth is the sum of the workers' queue depths, live."""
        # Given two workers with one delivery greenlet each, and a locked destination; no
        # linger, so that each greenlet takes the first entry that reaches it at once
        server = ready(launch(env={"NEXUS_QUEUE_WORKERS": "1", "NEXUS_DELIVERY_LINGER": "0"}))
        ledger = Ledger()
        with locked(server.db_path):
            # When writes reach both workers and wait there (one held by the stalled write, the rest queued)
            write_until_both_workers_hold_entries(server, ledger, at_least=2)
            accepted = ledger.acked_count
            per_worker = statuses(server)
            depths = [s["destinations"]["default"]["queue_depth"] for s in per_worker.values()]
            assert all(d > 0 for d in depths), per_worker
            # Then the gauge (published every second by each worker) is their live sum ...
            wait_for(
                lambda: metric(server.port, "nexus_queue_depth", destination="default") == sum(depths),
                10,
                f"nexus_queue_depth == {sum(depths)} ({depths})",
                describe=lambda: scrape(server.port),
            )
            text = scrape(server.port)
            # ... which is every undelivered write but the one each worker's delivery greenlet holds
            # in its stalled write (the queue's depth counts what waits, not what is being written)
            assert sum(depths) == accepted - len(per_worker), (depths, accepted)
            assert metric_sum(text, "nexus_backlog_entries") == 0
            assert metric_sum(text, "nexus_wal_pending_entries") == accepted
        # ... and once the destination is back, everything is delivered and the gauge falls to 0
        wait_delivered(server.db_path, ledger.snapshot_acked(), timeout=30)
        wait_for(
            lambda: metric(server.port, "nexus_queue_depth") == 0 == metric(server.port, "nexus_wal_pending_entries"),
            10,
            "nexus_queue_depth and nexus_wal_pending_entries == 0",
            describe=lambda: scrape(server.port),
        )
        assert_exactly_once(ledger, server)


class TestLogs:
    """The log stream an operator ships: requests, never secrets or bodies."""

    def test_log_stream_holds_request_lines_but_no_token_and_no_body(self, launch: Launcher) -> None:
        """A run's stdout+stderr holds "event": "request" lines, and neither any token nor any body content."""
        # Given two workers whose stdout and stderr go to one file
        server = ready(launch())
        marker = f"body-marker-{uuid.uuid4().hex}"
        wrong_token = f"wrong-token-{uuid.uuid4().hex}"
        # When a run sees accepted, invalid and unauthorised writes, and admin and query reads
        accepted = post(server.port, json.dumps({"n": 1, "secret": marker, "nested": {"m": marker}}).encode())
        assert accepted.status == 202
        assert post(server.port, f'{{"n": 2, "broken": "{marker}'.encode()).status == 400
        assert post(server.port, f'["{marker}"]'.encode()).status == 400
        bad = {"Authorization": f"Bearer {wrong_token}", "Content-Type": "application/json"}
        assert post(server.port, f'{{"n": 3, "m": "{marker}"}}'.encode(), bad).status == 401
        as_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
        assert post(server.port, f'{{"n": 4, "m": "{marker}"}}'.encode(), as_admin).status == 403
        assert exchange(server.port, "GET", "/metrics", headers=admin_headers()).status == 200
        assert exchange(server.port, "GET", "/admin/status", headers=admin_headers()).status == 200
        assert (
            exchange(server.port, "GET", "/metrics", headers={"Authorization": f"Bearer {wrong_token}"}).status == 401
        )
        wait_delivered(server.db_path, [accepted.json()["payload_id"]], timeout=30)
        query = exchange(server.port, "GET", "/query/default", headers=SOURCE_AUTH)
        assert marker.encode() in query.body  # the service does hold the body ...
        # ... and the run ends with a drain, so every line is written
        code, _ = server.stop()
        assert code == 0, server.log_tail()
        log = server.log_text()
        # Then the log holds no token and no body content ...
        for secret in (TOKEN, ADMIN_TOKEN, wrong_token, marker):
            assert secret not in log, f"{secret!r} is in the log"
        # ... but one request line per request, with its status
        statuses_seen = sorted(r["status"] for r in server.events("request") if r.get("path") == "/inbound/default")
        assert statuses_seen == [202, 400, 400, 401, 403], statuses_seen
        assert '"event":"request"' in log.replace(" ", "")


class TestAdminStatus:
    """GET /admin/status: what each worker holds, and every WAL directory."""

    def test_admin_status_shows_depth_wal_pending_and_both_workers_wal_directories(self, launch: Launcher) -> None:
        """Each worker's /admin/status shows queue depth, WAL pending and both workers' WAL directories."""
        # Given two workers holding undelivered entries (the destination is locked)
        server = ready(launch(env={"NEXUS_QUEUE_WORKERS": "1"}))
        ledger = Ledger()
        with locked(server.db_path):
            write_until_both_workers_hold_entries(server, ledger)
            # When each worker is asked for its status
            per_worker = statuses(server)
        pids = sorted(server.worker_pids())
        assert sorted(per_worker) == pids
        own_dirs = set()
        for pid, status in per_worker.items():
            # Then each shows the destination's depth, capacity, backlog and availability ...
            default = status["destinations"]["default"]
            assert set(default) >= {"queue_depth", "queue_capacity", "backlog", "available", "retry_after_seconds"}
            assert 0 <= default["queue_depth"] <= status["wal"]["pending"]
            assert default["queue_capacity"] == 10_000
            # ... its WAL: pending entries, bytes and segments, and the dead-letter count ...
            assert status["wal"]["pending"] > 0
            assert status["wal"]["size_bytes"] > 0
            assert status["wal"]["segments"] >= 1
            assert status["dead_letters"] == 0
            # ... and every WAL directory with the live worker holding it, itself marked
            dirs = {d["directory"]: d for d in status["workers"]}
            assert sorted(dirs) == ["w0", "w1"], status["workers"]
            assert sorted(d["pid"] for d in dirs.values()) == pids
            assert all(d["alive"] for d in dirs.values())
            own = status["worker"]["wal_directory"]
            assert dirs[own]["pid"] == pid
            assert dirs[own]["this_worker"] is True
            assert [d for d in dirs.values() if d["this_worker"]] == [dirs[own]]
            own_dirs.add(own)
        assert own_dirs == {"w0", "w1"}
        # ... and the WAL pending counts add up to the writes not delivered yet
        assert sum(s["wal"]["pending"] for s in per_worker.values()) == ledger.acked_count

    def test_admin_status_needs_the_admin_token(self, launch: Launcher) -> None:
        """/admin/status answers 401 without a token and 403 with a source's token."""
        server = ready(launch())
        assert_error_shape(exchange(server.port, "GET", "/admin/status"), 401, "unauthorized")
        assert_error_shape(exchange(server.port, "GET", "/admin/status", headers=SOURCE_AUTH), 403, "admin_only")


def dead_letters(port: int) -> dict[str, Any]:
    response = exchange(port, "GET", "/admin/dead-letters", headers=admin_headers())
    assert response.status == 200, response
    return {d["payload_id"]: d for d in response.json()["dead_letters"]}


class TestDeadLetters:
    """Dead letters over HTTP: listed with their error, retried after the fix, delivered once."""

    def test_dead_letter_round_trip_over_http(self, launch: Launcher) -> None:
        """A rejected entry is dead-lettered after 2 attempts; retried after the fix, it is stored once and unlisted."""
        # Given two workers with two attempts per entry, and a destination that refuses one payload
        server = ready(launch(env=DEAD_LETTER_ENV))
        ledger = Ledger()
        with poisoned(server.db_path, POISON):
            # When the poison entry is written together with twenty neighbours
            with ThreadPoolExecutor(max_workers=6) as pool:
                poison = pool.submit(write, server.port, ledger, 1000, f', "tag": "{POISON}"')
                neighbours = list(pool.map(lambda n: write(server.port, ledger, n), range(20)))
            assert poison.result().status == 202
            assert [r.status for r in neighbours] == [202] * 20
            poison_id = poison.result().json()["payload_id"]
            # Then it is listed as a dead letter, with its last error and both attempts ...
            letter = wait_for(
                lambda: dead_letters(server.port).get(poison_id),
                15,
                "the poison entry in /admin/dead-letters",
                describe=server.log_tail,
            )
            assert letter is not None
            assert letter["attempts"] == 2, letter
            assert "poison" in letter["last_error"], letter
            assert letter["status"] == "dead"
            # ... while its neighbours are delivered, and it is not
            neighbour_ids = [r.json()["payload_id"] for r in neighbours]
            wait_delivered(server.db_path, neighbour_ids, timeout=30)
            assert poison_id not in count_rows(server.db_path)
            assert metric(server.port, "nexus_permanent_failures_total") == 1
            # When the destination is fixed (the trigger dropped)
        # ... and the operator retries the dead letter
        retry = exchange(server.port, "POST", f"/admin/dead-letters/{poison_id}/retry", headers=admin_headers())
        assert retry.status == 202, retry
        assert retry.json() == {"payload_id": poison_id, "status": "retrying"}
        # Then it is delivered, and leaves the dead-letter list once delivered ...
        wait_delivered(server.db_path, [poison_id], timeout=30)
        wait_for(
            lambda: poison_id not in dead_letters(server.port),
            15,
            "the retried entry to leave /admin/dead-letters",
            describe=server.log_tail,
        )
        # ... stored exactly once, like every neighbour
        assert_exactly_once(ledger, server)
        assert count_rows(server.db_path)[poison_id] == 1

    def test_dead_letter_endpoints_need_the_admin_token_and_an_unknown_id_is_404(self, launch: Launcher) -> None:
        """Dead-letter list and retry: 401 without a token, 403 with a source's; an unknown id's retry is 404."""
        # Given two workers
        server = ready(launch())
        retry_path = f"/admin/dead-letters/{uuid.uuid4().hex}/retry"
        # When the dead-letter endpoints are called without the admin token
        # Then they are refused: 401 without a token, 403 with a source's token
        assert_error_shape(exchange(server.port, "GET", "/admin/dead-letters"), 401, "unauthorized")
        assert_error_shape(exchange(server.port, "GET", "/admin/dead-letters", headers=SOURCE_AUTH), 403, "admin_only")
        assert_error_shape(exchange(server.port, "POST", retry_path), 401, "unauthorized")
        assert_error_shape(exchange(server.port, "POST", retry_path, headers=SOURCE_AUTH), 403, "admin_only")
        # ... and with the admin token, the list is empty and an unknown id is 404
        assert dead_letters(server.port) == {}
        assert_error_shape(
            exchange(server.port, "POST", retry_path, headers=admin_headers()), 404, "unknown_dead_letter"
        )
