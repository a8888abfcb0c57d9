"""The production process model: real gunicorn behind a real nginx run from deploy/nginx.conf.

Writes go through nginx to gunicorn's gevent workers; a full queue is forced by holding
SQLite's write lock on the destination from the test, so delivery pauses while writes
keep arriving. Scaling is tested both ways: down (fewer workers than WAL directories
after a crash) and out (two instances behind one nginx upstream, one PostgreSQL).
nginx's own errors (413, 502, 503, 504) are in the API's shape, while the service's own
errors pass through it unchanged; a small socket server stands in for a hung instance.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.proc import (
    SMALL_QUEUE,
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
from tests.support.services import HOST, free_port

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
#: The test rendering's proxy_read_timeout, for a 504 in a moment (the shipped one is 30 s).
SHORT_READ_TIMEOUT = "1s"
#: How long a test waits for something that takes milliseconds (a connection, an answer).
QUICK = 30.0


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


def served(server: Gunicorn, request_id: str) -> dict[str, Any]:
    """The service's log line for the request with `request_id` (waits for it): proof the service answered it."""
    lines = wait_for(
        lambda: [r for r in server.events("request") if r.get("request_id") == request_id],
        QUICK,
        "the service's request line",
        describe=server.log_tail,
    )
    return lines[0]


def unready(port: int) -> Response | None:
    """GET /ready's answer if it is 503, else None (for `wait_for`)."""
    response = exchange(port, "GET", "/ready")
    return response if response.status == 503 else None


def assert_nginx_error(response: Response, status: int, code: str, *, retry_after: bool) -> dict[str, Any]:
    """nginx's own answer `status` in the API's shape: JSON, `code`, and Retry-After 1 agreeing with the body if any."""
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json", response.headers
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str), body
    assert body["message"], body
    assert isinstance(body["details"], dict), body
    if retry_after:
        assert set(body) == {"error", "message", "details", "retry_after_seconds"}, body
        assert (response.headers.get("retry-after"), body["retry_after_seconds"]) == ("1", 1), response
    else:
        assert set(body) == {"error", "message", "details"}, body
        assert "retry-after" not in response.headers, response.headers
    # ... and the request id, as the service's answers carry it
    assert response.headers.get("x-request-id"), response.headers
    return body


class SilentUpstream:
    """A TCP server that accepts every connection and never answers: a hung service, as nginx sees it."""

    def __init__(self) -> None:
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        #: Set once nginx has connected: its request is then past nginx's own phases.
        self.accepted = threading.Event()
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-upstream", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was shut down
                return
            self._held.append(conn)
            self.accepted.set()

    def close(self) -> None:
        """Stop accepting and close every held connection (nginx then sees the upstream close)."""
        # shutdown() wakes the accept() blocked in the thread; close() alone would not on Linux.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(QUICK)
        for conn in self._held:
            conn.close()


@pytest.fixture
def silent_upstream() -> Iterator[SilentUpstream]:
    upstream = SilentUpstream()
    yield upstream
    upstream.close()


@pytest.mark.nginx
class TestNginxOwnAnswers:
    """What nginx answers by itself (no instance reachable, one that never answers, a limit) is in the API's shape."""

    def test_no_instance_listening_is_a_json_502_with_retry_after_one(self, nginx: LaunchNginx) -> None:
        """Nothing listening upstream: nginx's 502 bad_gateway as JSON, Retry-After 1 and retry_after_seconds 1."""
        # Given nginx in front of a port nothing listens on
        proxy = nginx([free_port()])
        request_id = f"deploy-{uuid.uuid4().hex}"
        # When a client writes, and then reads a path whose extension nginx maps to text/html
        write = post(proxy.port, 0, request_id=request_id)
        page = exchange(proxy.port, "GET", "/v1/logs.html")
        # Then both answers are nginx's 502 in the API's shape, never an HTML page ...
        for response in (write, page):
            assert_nginx_error(response, 502, "bad_gateway", retry_after=True)
        # ... and the client's request id comes back on it
        assert write.headers["x-request-id"] == request_id

    def test_an_instance_that_never_answers_is_a_json_504_with_retry_after_one(
        self, nginx: LaunchNginx, silent_upstream: SilentUpstream
    ) -> None:
        """An upstream that accepts and never answers gets nginx's 504 gateway_timeout as JSON, with Retry-After 1."""
        # Given nginx, with a 1 s proxy_read_timeout, in front of an upstream that never answers
        proxy = nginx([silent_upstream.port], read_timeout=SHORT_READ_TIMEOUT)
        # When a client writes
        response = post(proxy.port, 0)
        # Then the request reached the upstream, and nginx answered 504 in the API's shape
        assert silent_upstream.accepted.wait(QUICK), "the request never reached the upstream"
        assert_nginx_error(response, 504, "gateway_timeout", retry_after=True)

    def test_a_request_over_an_added_connection_limit_is_a_json_503_with_retry_after_one(
        self, nginx: LaunchNginx, silent_upstream: SilentUpstream
    ) -> None:
        """With limit_conn 1 added, a second request while one is in flight gets nginx's 503 as JSON, Retry-After 1."""
        # Given nginx with `limit_conn 1` (test rendering only: the shipped file sets no limit),
        # in front of an upstream that holds the one request it is sent
        proxy = nginx([silent_upstream.port], conn_limit=1)
        with ThreadPoolExecutor(max_workers=1) as pool:
            first: Future[Response] = pool.submit(post, proxy.port, 0)
            assert silent_upstream.accepted.wait(QUICK), "the first request never reached the upstream"
            # When a second request comes while the first is in flight
            second = post(proxy.port, 1)
            # ... and the upstream then closes without answering the first
            silent_upstream.close()
            held = first.result(QUICK)
        # Then the second is nginx's 503 in the API's shape ...
        assert_nginx_error(second, 503, "service_unavailable", retry_after=True)
        # ... and the first, cut off by the upstream, nginx's 502
        assert_nginx_error(held, 502, "bad_gateway", retry_after=True)


@pytest.mark.nginx
class TestServiceAnswersPassThrough:
    """The service's own errors reach the client through nginx unchanged: error_page never replaces them."""

    def test_the_service_own_413_passes_through_unchanged(self, launch: Launcher, nginx: LaunchNginx) -> None:
        """A body over a lower NEXUS_MAX_BODY_BYTES gets the service's 413 (its limit in details), not nginx's."""
        # Given a service that takes at most 1000 bytes, behind nginx (which takes 1 MiB)
        server = ready(launch(env={"NEXUS_MAX_BODY_BYTES": "1000"}))
        proxy = nginx([server.port])
        body = b'{"pad": "' + b"x" * 2000 + b'"}'
        request_id = f"deploy-{uuid.uuid4().hex}"
        headers = {**post_headers(), "X-Request-Id": request_id}
        # When it is sent through nginx, and straight to the service
        through = exchange(proxy.port, "POST", "/inbound/default", body, headers)
        direct = exchange(server.port, "POST", "/inbound/default", body, post_headers())
        # Then both are the service's 413, byte for byte the same body, with its own limit
        assert (through.status, direct.status) == (413, 413), (through, direct)
        assert through.body == direct.body
        assert through.json()["details"] == {"max_body_bytes": 1000}
        assert through.headers["content-type"] == direct.headers["content-type"]
        # ... answered by the service (its request line), not by nginx
        assert through.headers["x-request-id"] == request_id
        assert served(server, request_id)["status"] == 413

    def test_the_service_own_503_passes_through_unchanged(self, launch: Launcher, nginx: LaunchNginx) -> None:
        """/ready's 503 not_ready (destination locked) reaches the client as the service wrote it, nothing added."""
        # Given one worker behind nginx, whose destination is locked while it delivers a write
        server = ready(launch(workers=1))
        proxy = nginx([server.port])
        with locked(server.db_path):
            assert post(proxy.port, 0).status == 202
            # When the worker finds the destination unavailable, and /ready is asked through nginx
            through = wait_for(lambda: unready(proxy.port), QUICK, "/ready to answer 503", describe=server.log_tail)
            assert through is not None  # wait_for returns only a truthy answer
            direct = exchange(server.port, "GET", "/ready")
        # Then the client gets the service's 503, not nginx's service_unavailable
        assert direct.status == 503, direct
        assert through.body == direct.body
        body = through.json()
        assert body["error"] == "not_ready", body
        assert body["details"]["reasons"] == ["destination_unavailable:default"], body
        # ... with nothing of nginx's answer added
        assert "retry-after" not in through.headers, through.headers
        assert through.headers["content-type"] == "application/json"

    def test_an_otlp_export_through_nginx_is_200_and_its_record_stored(
        self, launch: Launcher, nginx: LaunchNginx
    ) -> None:
        """POST /v1/logs (OTLP/JSON) through nginx: the service's 200 ExportLogsServiceResponse, the record one row."""
        # Given two workers behind nginx
        server = ready(launch())
        proxy = nginx([server.port])
        request_id = f"deploy-{uuid.uuid4().hex}"
        headers = {**post_headers(), "X-Request-Id": request_id}
        # When an exporter posts one log record to /v1/logs through nginx
        through = exchange(proxy.port, "POST", "/v1/logs", OTLP_JSON_EXPORT, headers)
        # Then the service's own answer reaches it: 200 and an empty ExportLogsServiceResponse
        assert through.status == 200, through
        assert through.json() == {}
        # ... which the service answered and logged
        line = served(server, request_id)
        assert (line["path"], line["status"]) == ("/v1/logs", 200)
        # ... and the record is one row, its subject the resource's service.name
        wait_for(lambda: len(count_rows(server.db_path)) == 1, 30, "the log record delivered")
        with contextlib.closing(sqlite3.connect(server.db_path)) as conn:
            row = conn.execute("SELECT subject, json_extract(payload, '$.body') FROM nexus_entries").fetchone()
        assert tuple(row) == ("via-nginx", "through nginx")


#: An OTLP/JSON ExportLogsServiceRequest of one record, as the OpenTelemetry JS exporter sends it.
OTLP_JSON_EXPORT = (
    b'{"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "via-nginx"}}]},'
    b' "scopeLogs": [{"scope": {"name": "deploy"}, "logRecords": [{"body": {"stringValue": "through nginx"}}]}]}]}'
)


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
        """1 MiB + 1 byte gets nginx's own 413 in the API's shape (the service never sees it); 1 MiB gets 202."""
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
        # Then nginx answers the first itself, as the service would: JSON in the API's shape ...
        body = assert_nginx_error(refused, 413, "payload_too_large", retry_after=False)
        assert body["details"] == {"max_body_bytes": MAX_BODY}
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
