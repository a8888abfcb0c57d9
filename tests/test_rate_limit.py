"""Per-source rate limits (issue 12, point 11): the shared token bucket, the 429 it answers, and its metric.

The bucket's arithmetic runs on an injected clock, so no test sleeps or depends on how
fast the machine is; the tests of sharing between processes compare what was admitted
with what the bucket may admit over the time actually measured around it.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import http.client
import math
import multiprocessing
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.synchronize import Barrier as ProcessBarrier
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from nexus_gevent import datadir
from nexus_gevent.rate_limit import RateLimits, TokenBucket, bucket_file
from tests.support.proc import (
    HOST,
    Gunicorn,
    Launcher,
    Response,
    admin_headers,
    exchange,
    metric_sum,
    post_headers,
    ready,
    scrape,
    wait_for,
)
from tests.test_http import OTHER_TOKEN, TWO_SOURCES_TOML, Harness, Node, assert_error, idempotency_keys


class FakeClock:
    """A time.monotonic() that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def bucket(path: Path, clock: FakeClock, *, rate: float = 5.0, burst: int = 10) -> TokenBucket:
    return TokenBucket(path / "source.bucket", rate, burst, clock=clock)


def admitted(b: TokenBucket, attempts: int) -> int:
    """How many of `attempts` takes of one token succeed, at one instant of the clock."""
    return sum(b.take(1) is None for _ in range(attempts))


class TestTokenBucket:
    """One bucket: the burst at once, then the rate; a refusal says how long to wait."""

    def test_a_new_bucket_admits_the_burst_then_refuses(self, tmp_path: Path, clock: FakeClock) -> None:
        """A fresh bucket of 10 admits 10 writes at one instant and refuses the 11th."""
        b = bucket(tmp_path, clock)
        assert [b.take(1) for _ in range(10)] == [None] * 10
        assert b.take(1) is not None

    def test_tokens_come_back_at_the_rate(self, tmp_path: Path, clock: FakeClock) -> None:
        """An empty bucket of 5/s admits one write after 0.2 s, and five after another second."""
        b = bucket(tmp_path, clock)
        assert admitted(b, 10) == 10
        clock.advance(0.1)
        assert b.take(1) is not None
        clock.advance(0.1)
        assert admitted(b, 5) == 1
        clock.advance(1.0)
        assert admitted(b, 10) == 5

    def test_tokens_never_exceed_the_burst(self, tmp_path: Path, clock: FakeClock) -> None:
        """After an hour of silence the bucket holds its burst, not an hour's worth."""
        b = bucket(tmp_path, clock)
        assert admitted(b, 10) == 10
        clock.advance(3600)
        assert admitted(b, 100) == 10

    def test_a_refused_take_takes_nothing(self, tmp_path: Path, clock: FakeClock) -> None:
        """Refused takes do not push the next admission later: it comes when the rate says."""
        b = bucket(tmp_path, clock)
        assert admitted(b, 10) == 10
        clock.advance(0.1)
        assert admitted(b, 50) == 0
        clock.advance(0.1)
        assert b.take(1) is None

    @pytest.mark.parametrize(
        "case",
        [
            # (rate, burst, n, seconds waited since the bucket emptied, Retry-After)
            (5.0, 10, 1, 0.0, 1),  # 0.2 s rounds up to the minimum of 1
            (0.5, 1, 1, 0.0, 2),  # one token at 0.5/s: 2 s
            (0.5, 1, 1, 1.0, 1),  # half of it came during the second waited
            (0.1, 3, 3, 0.0, 30),  # three tokens at 0.1/s
            (0.1, 3, 3, 5.0, 25),  # ... of which half a token came in 5 s
            (2.0, 4, 3, 0.0, 2),  # 1.5 s rounds up
            (1000.0, 5, 1, 0.0, 1),  # a millisecond is still at least 1 s (RFC 9110 10.2.3)
        ],
    )
    def test_retry_after_is_the_whole_seconds_until_n_tokens_are_there(
        self, tmp_path: Path, clock: FakeClock, case: tuple[float, int, int, float, int]
    ) -> None:
        """Retry-After is ceil(time until n tokens are there), at least 1."""
        rate, burst, n, idle, expected = case
        b = bucket(tmp_path, clock, rate=rate, burst=burst)
        assert admitted(b, burst) == burst
        clock.advance(idle)
        assert b.take(n) == expected

    def test_a_client_that_waits_its_retry_after_is_admitted(self, tmp_path: Path, clock: FakeClock) -> None:
        """Waiting exactly the Retry-After given is enough for the write that was refused."""
        b = bucket(tmp_path, clock, rate=0.3, burst=2)
        assert admitted(b, 2) == 2
        wait = b.take(2)
        assert wait == math.ceil(2 / 0.3)
        clock.advance(wait)
        assert b.take(2) is None

    def test_more_than_the_burst_at_once_is_refused_as_a_programming_error(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """take(n) with n over the burst could never succeed: ValueError, not a Retry-After."""
        with pytest.raises(ValueError, match="cannot take 11 tokens"):
            bucket(tmp_path, clock).take(11)

    @pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (math.inf, 1), (math.nan, 1), (1.0, 0)])
    def test_a_bucket_needs_a_positive_rate_and_a_burst_of_at_least_one(
        self, tmp_path: Path, rate: float, burst: int
    ) -> None:
        """A rate that is not a positive number, or a burst under 1, is a ValueError."""
        with pytest.raises(ValueError):
            TokenBucket(tmp_path / "x.bucket", rate, burst)


class TestSharedFile:
    """The bucket's state is its file: every TokenBucket on it, in any process, shares one budget."""

    def test_two_buckets_on_one_file_share_one_budget(self, tmp_path: Path, clock: FakeClock) -> None:
        """Two workers' buckets on one file admit one burst between them, and one rate."""
        first, second = bucket(tmp_path, clock), bucket(tmp_path, clock)
        assert admitted(first, 6) == 6
        assert admitted(second, 10) == 4
        assert first.take(1) is not None
        clock.advance(1.0)
        assert admitted(second, 3) + admitted(first, 10) == 5

    def test_the_state_outlives_the_bucket_object(self, tmp_path: Path, clock: FakeClock) -> None:
        """A restarted worker finds the bucket as it was left: an emptied bucket is still empty."""
        first = bucket(tmp_path, clock)
        assert admitted(first, 10) == 10
        first.close()
        assert bucket(tmp_path, clock).take(1) is not None

    def test_a_smaller_burst_caps_the_tokens_a_larger_one_left(self, tmp_path: Path, clock: FakeClock) -> None:
        """After a configuration change from burst 10 to 3, a full bucket admits 3."""
        assert admitted(bucket(tmp_path, clock, burst=10), 1) == 1
        assert admitted(bucket(tmp_path, clock, burst=3), 10) == 3

    def test_a_stamp_from_before_a_reboot_neither_refills_nor_empties_the_bucket(
        self, tmp_path: Path, clock: FakeClock
    ) -> None:
        """time.monotonic() restarts at a reboot: a stamp ahead of the clock counts as now."""
        b = bucket(tmp_path, clock, rate=1.0, burst=10)
        assert admitted(b, 7) == 7
        rebooted = FakeClock(5.0)
        after = bucket(tmp_path, rebooted, rate=1.0, burst=10)
        assert admitted(after, 10) == 3
        rebooted.advance(1.0)
        assert admitted(after, 10) == 1

    @pytest.mark.parametrize("content", [b"", b"\x00" * 24, b"garbage", b"\xff" * 24])
    def test_a_new_or_damaged_file_starts_full(self, tmp_path: Path, clock: FakeClock, content: bytes) -> None:
        """An empty, zeroed, short or foreign bucket file is a full bucket, never a stuck one."""
        (tmp_path / "source.bucket").write_bytes(content)
        assert admitted(bucket(tmp_path, clock), 20) == 10

    def test_bucket_files_are_0600_in_a_0700_directory_under_umask_022(self, tmp_path: Path) -> None:
        """RateLimits.open creates ratelimit/ 0700 and one 0600 file per limited source, whatever the umask."""
        previous = os.umask(0o022)
        try:
            limits = RateLimits.open(tmp_path / "ratelimit", [("a", 1.0, 1), ("b.v2", 2.0, 4)])
        finally:
            os.umask(previous)
        try:
            folder = tmp_path / "ratelimit"
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert sorted(p.name for p in folder.iterdir()) == ["a.bucket", "b.v2.bucket"]
            for path in folder.iterdir():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert sorted(limits.buckets) == ["a", "b.v2"]
        finally:
            limits.close()

    def test_no_limited_source_creates_nothing(self, tmp_path: Path) -> None:
        """Without a limited source, no folder and no file."""
        limits = RateLimits.open(tmp_path / "ratelimit", [])
        assert limits.buckets == {}
        assert not (tmp_path / "ratelimit").exists()


#: The multiprocess test's bucket: fast enough that the processes contend for it for real.
MP_RATE = 200.0
MP_BURST = 50
MP_SECONDS = 0.5


def _hammer(path: str, barrier: ProcessBarrier, results: ProcessQueue[tuple[int, float, float]]) -> None:
    """Take one token at a time for MP_SECONDS; report (admitted, before the first take, after the last)."""
    b = TokenBucket(Path(path), MP_RATE, MP_BURST)
    barrier.wait()
    first = time.monotonic()
    count = 0
    while True:
        if b.take(1) is None:
            count += 1
        last = time.monotonic()
        if last - first >= MP_SECONDS:
            break
    results.put((count, first, last))


class TestProcesses:
    def test_two_processes_never_admit_more_than_burst_plus_rate_times_elapsed(self, tmp_path: Path) -> None:
        """Two processes hammering one file admit between them at least the burst, at most burst + rate * elapsed."""
        path = bucket_file(tmp_path, "shared")
        TokenBucket(path, MP_RATE, MP_BURST).close()  # created full, before either process starts
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(2)
        results: ProcessQueue[tuple[int, float, float]] = ctx.Queue()
        procs = [ctx.Process(target=_hammer, args=(str(path), barrier, results)) for _ in range(2)]
        for proc in procs:
            proc.start()
        reports = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(30)
            assert proc.exitcode == 0
        total = sum(count for count, _, _ in reports)
        # time.monotonic() is one clock for every process: every take happened in [start, end].
        elapsed = max(last for _, _, last in reports) - min(first for _, first, _ in reports)
        assert total <= MP_BURST + MP_RATE * elapsed + 1e-6, (total, elapsed, reports)
        assert total >= MP_BURST, reports


# -- HTTP, in-process ----------------------------------------------------------------

#: A burst of 2 and a rate so slow that no token comes back during a test.
SLOW = {"NEXUS_RATE_LIMIT_PER_SECOND": "0.001", "NEXUS_RATE_LIMIT_BURST": "2"}

LIMITED_DEFAULT_TOML = TWO_SOURCES_TOML.replace(
    'name = "default"\ndestination = "default"\n',
    'name = "default"\ndestination = "default"\nrate_limit_per_second = 0.001\nrate_limit_burst = 2\n',
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def refused_count(source: str) -> float:
    return REGISTRY.get_sample_value("nexus_writes_rate_limited_total", {"source": source}) or 0.0


class TestHttp:
    """POST /inbound/{source} over the source's limit: 429 rate_limit_exceeded, nothing stored."""

    def test_over_the_limit_a_write_is_429_rate_limit_exceeded_and_nothing_is_stored(self, harness: Harness) -> None:
        """Past the burst: 429 rate_limit_exceeded with Retry-After; the WAL and the destination never see it."""
        node = harness.start(SLOW)
        ids = [node.accepted({"n": 1}), node.accepted({"n": 2})]
        node.wait_settled()
        pending_before = node.wal_pending

        result = node.post({"n": 3})

        body = assert_error(result, 429, "rate_limit_exceeded")
        assert 1 <= int(result.headers["Retry-After"]) <= 1000
        assert body["details"] == {"durable": False, "rate_limit_per_second": 0.001, "rate_limit_burst": 2}
        assert "payload_id" not in body
        assert node.wal_pending == pending_before == 0
        node.wait_settled()
        assert node.delivered_ids() == ids

    def test_refused_writes_are_counted_per_source(self, harness: Harness) -> None:
        """nexus_writes_rate_limited_total{source} counts each 429 rate_limit_exceeded, and no other answer."""
        node = harness.start(SLOW)
        before = refused_count("default")
        statuses = [node.post({"n": n}).status_code for n in range(5)]
        assert statuses == [202, 202, 429, 429, 429]
        assert refused_count("default") - before == 3

    def test_another_source_is_not_held_back_by_a_noisy_one(self, harness: Harness) -> None:
        """With 'default' over its limit, 'other' (no limit) on the same destination still gets 202."""
        node = harness.start({"NEXUS_CONFIG": harness.config_file(LIMITED_DEFAULT_TOML)})
        assert [node.post({"n": n}).status_code for n in range(4)] == [202, 202, 429, 429]
        for n in range(20):
            node.accepted({"n": n}, source="other", token=OTHER_TOKEN)
        assert node.post({"n": 9}).status_code == 429

    def test_without_a_limit_writes_are_never_rate_limited(self, harness: Harness) -> None:
        """No rate set: a hundred writes at once are all 202, and no bucket file exists."""
        node = harness.start()
        for n in range(100):
            node.accepted({"n": n})
        assert not datadir.rate_limit_dir(harness.data_dir).exists()

    def test_a_resend_of_a_stored_key_is_200_duplicate_even_over_the_limit(self, harness: Harness) -> None:
        """A retry of an already-stored Idempotency-Key is answered 200 duplicate and costs no token."""
        node = harness.start(SLOW)
        original = node.accepted(headers={"Idempotency-Key": "k-1"})
        node.accepted()
        assert node.post().status_code == 429

        for _ in range(3):
            result = node.post(headers={"Idempotency-Key": "k-1"})
            assert result.status_code == 200, result.text
            assert result.json == {"payload_id": original, "status": "duplicate"}

    def test_a_refused_key_is_not_claimed(self, harness: Harness) -> None:
        """A write refused by the limit leaves its Idempotency-Key unused, for the retry to claim."""
        node = harness.start(SLOW)
        node.accepted()
        node.accepted()
        result = node.post(headers={"Idempotency-Key": "k-refused"})
        assert_error(result, 429, "rate_limit_exceeded")
        assert node.service.index.lookup("default", "k-refused") is None
        assert idempotency_keys(harness.data_dir) == 0

    def test_two_workers_on_one_data_dir_share_one_budget(self, harness: Harness) -> None:
        """Two services on one data directory (two workers: w0 and w1) admit one burst between them, not two."""
        first: Node = harness.start(SLOW)
        second: Node = harness.start(SLOW)
        assert first.service.lock.path != second.service.lock.path
        answers = [first.post({"n": 1}), second.post({"n": 2}), first.post({"n": 3}), second.post({"n": 4})]
        assert [a.status_code for a in answers] == [202, 202, 429, 429]


# -- real gunicorn, two workers ---------------------------------------------------------

RATE = 5
BURST = 10
CONNECTIONS_PER_WORKER = 3
WRITES_PER_CONNECTION = 20


def connections_on_every_worker(server: Gunicorn, per_worker: int) -> dict[int, list[http.client.HTTPConnection]]:
    """Keep-alive connections, `per_worker` on each worker (a connection stays with the worker that accepted it)."""
    pids = set(server.worker_pids())
    kept: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}

    def enough() -> bool:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=15)
        status = exchange(server.port, "GET", "/admin/status", headers=admin_headers(), conn=conn)
        assert status.status == 200, status
        pid = status.json()["worker"]["pid"]
        if len(kept.setdefault(pid, [])) < per_worker:
            kept[pid].append(conn)
        else:
            conn.close()
        return all(len(kept[p]) >= per_worker for p in pids)

    wait_for(enough, 20, f"{per_worker} connections on each of workers {sorted(pids)}", interval=0)
    return kept


def fire(server: Gunicorn, conn: http.client.HTTPConnection, count: int) -> list[Response]:
    try:
        return [
            exchange(server.port, "POST", "/inbound/default", f'{{"n": {n}}}'.encode(), post_headers(), conn=conn)
            for n in range(count)
        ]
    finally:
        conn.close()


@pytest.mark.process
class TestAcrossWorkers:
    def test_two_gunicorn_workers_together_admit_one_limit_and_metrics_count_the_refusals(
        self, launch: Launcher
    ) -> None:
        """Under gunicorn with 2 workers, 5/s burst 10 holds for both together; /metrics counts every 429."""
        # Given two workers, a limit of 5/s with a burst of 10, and connections on both workers
        env = {"NEXUS_RATE_LIMIT_PER_SECOND": str(RATE), "NEXUS_RATE_LIMIT_BURST": str(BURST)}
        server = ready(launch(workers=2, env=env))
        by_worker = connections_on_every_worker(server, CONNECTIONS_PER_WORKER)
        assert len(by_worker) == 2
        # When every connection sends its writes back to back, all at once
        jobs = [(pid, conn) for pid, conns in by_worker.items() for conn in conns]
        started = time.monotonic()
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: (job[0], fire(server, job[1], WRITES_PER_CONNECTION)), jobs))
        elapsed = time.monotonic() - started
        # Then both workers together admitted one burst plus the rate over the time taken (two limits would allow twice)
        outcomes = Counter((r.status, r.json().get("error", "")) for _, responses in answers for r in responses)
        accepted = outcomes[(202, "")]
        refused = outcomes[(429, "rate_limit_exceeded")]
        assert accepted + refused == len(jobs) * WRITES_PER_CONNECTION, outcomes
        assert BURST <= accepted <= BURST + RATE * elapsed + 1, (outcomes, elapsed)
        assert refused > 0, (outcomes, elapsed)
        # ... both workers answered (each connection stays with its worker), and every 429 says when to retry
        assert {pid for pid, responses in answers if responses} == set(by_worker)
        for _, responses in answers:
            for r in responses:
                if r.status == 429:
                    assert int(r.headers["retry-after"]) >= 1
                    assert r.json()["retry_after_seconds"] == int(r.headers["retry-after"])
        # ... and /metrics, summed over both workers, counts exactly the refusals the client saw
        text = scrape(server.port)
        assert metric_sum(text, "nexus_writes_rate_limited_total", source="default") == refused
        assert metric_sum(text, "nexus_writes_accepted_total", source="default") == accepted
