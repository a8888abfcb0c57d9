"""Soak: a fixed offered rate for a while, with destination outages; memory, WAL size and lag must stay flat.

    .venv/bin/python -m bench.soak [--seconds 60] [--rate 500] [--workers 2]
                                   [--outage-every 15] [--outage-for 3] [--postgres-url URL]

Starts gunicorn (gunicorn.conf.py, a fresh data directory) and offers `--rate`
writes per second from client threads over keep-alive `http.client` connections,
each thread sending on a shared schedule (slot k is due at start + k / rate; a slot
more than a second late is skipped and counted, so a stalled service is not hit by
a burst afterwards). Every `--outage-every` seconds the destination is made
unavailable for `--outage-for` seconds:

- SQLite (the default, in the data directory): a connection holds its write lock
  (BEGIN EXCLUSIVE), so the service's writes fail with "database is locked";
- PostgreSQL (`--postgres-url`, a database the service may create its table in): a
  transaction holds `LOCK TABLE nexus_entries IN ACCESS EXCLUSIVE MODE`, which
  stalls delivery the same way. The server itself is not restarted: an outside URL
  cannot be stopped from here.

Every `--sample-every` seconds it samples the workers' RSS (VmRSS of each gunicorn
worker, from /proc), the WAL's size (the bytes of every file under data/wal) and the
delivery lag (acknowledged writes minus rows in the destination). At the end it
stops the load, waits for the lag to reach zero, stops gunicorn with SIGTERM, prints
a table and writes bench/results/soak.json.

Flatness: the median of the last third of the samples is compared with the median
of the first third, each with a generous allowance (see `LIMITS`). The exit code is
1 if any of RSS, WAL size or lag grew past it, or if the backlog did not clear.

WAL segments are 1 MiB here (`--wal-segment-bytes`), not the production 64 MiB, so
that a one-minute soak sees segments fill, settle and be reclaimed several times:
with 64 MiB segments the WAL only grows for the first minutes of any run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.support.proc import (
    SOURCE,
    Gunicorn,
    KeepAlive,
    children_of,
    destination_locked,
    is_alive,
    post_headers,
    start_gunicorn,
    wait_for,
    wait_table,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soak.json"
MIB = 1024 * 1024
#: A slot this late is skipped rather than sent in a burst.
MAX_BEHIND_SECONDS = 1.0
#: How long the backlog may take to clear after the load stops.
SETTLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class SoakConfig:
    """What to offer, for how long, and how often to break the destination and look."""

    seconds: float = 60.0
    rate: float = 500.0
    workers: int = 2
    threads: int = 8
    sample_every: float = 5.0
    outage_every: float = 15.0
    outage_for: float = 3.0
    wal_segment_bytes: int = MIB
    postgres_url: str | None = None


@dataclass
class Sample:
    """One look at the service: seconds since the load started, memory, WAL, lag."""

    t: float
    rss_bytes: int
    rss_per_worker: list[int]
    wal_bytes: int
    acked: int
    delivered: int
    lag: int
    outage: bool


@dataclass
class Limit:
    """One flatness check: the first third's median, the last third's, and the most the last may be."""

    metric: str
    first: float
    last: float
    allowed: float

    @property
    def ok(self) -> bool:
        return self.last <= self.allowed


# How much each metric's last-third median may exceed its first-third median. Generous:
# a leak or an unbounded WAL grows without end and crosses these within a minute;
# warm-up, a segment that has not rotated yet or an outage in a sample do not.
#: RSS: a quarter more, plus 16 MiB of allocator and cache warm-up.
RSS_FACTOR, RSS_SLACK = 1.25, 16 * MIB
#: WAL: twice, plus two segments per worker (the open one, one waiting to be settled).
WAL_FACTOR, WAL_SEGMENTS_SLACK = 2.0, 2
#: Lag: what one outage piles up at the offered rate, plus a second of traffic.
LAG_OUTAGE_SECONDS_SLACK = 1.0


@dataclass
class SoakResult:
    """Everything measured; `flat` and `settled` say whether the run passed."""

    config: SoakConfig
    samples: list[Sample]
    limits: list[Limit]
    sent: int
    acked: int
    skipped: int
    statuses: dict[str, int]
    errors: dict[str, int]
    achieved_rate: float
    delivered_at_end: int
    settled: bool
    seconds_to_settle: float
    p50_ms: float
    p99_ms: float
    stop_code: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flat(self) -> bool:
        return all(limit.ok for limit in self.limits)

    @property
    def passed(self) -> bool:
        return self.flat and self.settled and not self.errors

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["limits"] = [{**asdict(limit), "ok": limit.ok} for limit in self.limits]
        data["flat"] = self.flat
        data["passed"] = self.passed
        return data


# -- the load --------------------------------------------------------------------------


class Loader:
    """Client threads offering `rate` writes per second on one shared schedule."""

    def __init__(self, port: int, rate: float, threads: int) -> None:
        self._port = port
        self._interval = 1.0 / rate
        self._threads = [threading.Thread(target=self._run, name=f"soak-{i}", daemon=True) for i in range(threads)]
        self._slots = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = 0.0
        self.sent = 0
        self.acked = 0
        self.skipped = 0
        self.statuses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []

    def start(self) -> None:
        self._start = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _slot(self) -> float:
        with self._lock:
            return self._start + next(self._slots) * self._interval

    def _record(self, status: int, body: bytes, seconds: float) -> None:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {}
        durable = status == 202 or (status == 429 and isinstance(parsed, dict) and "payload_id" in parsed)
        with self._lock:
            self.sent += 1
            self.statuses[str(status)] += 1
            self.acked += durable
            self.latencies.append(seconds)

    def _run(self) -> None:
        headers = post_headers()
        with contextlib.closing(KeepAlive(self._port, timeout=30)) as client:
            while not self._stop.is_set():
                due = self._slot()
                # Pacing, not synchronisation: wait for this slot's time, or for stop.
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                if time.monotonic() - due > MAX_BEHIND_SECONDS:
                    with self._lock:
                        self.skipped += 1
                    continue
                body = json.dumps({"soak": due, "pad": "x" * 64}).encode()
                started = time.monotonic()
                try:
                    response = client.post(f"/inbound/{SOURCE}", body, headers)
                except (OSError, http.client.HTTPException) as exc:
                    with self._lock:
                        self.errors[type(exc).__name__] += 1
                    continue
                self._record(response.status, response.body, time.monotonic() - started)


# -- the destination ----------------------------------------------------------------------


class Destination:
    """Counts the delivered rows and makes the destination unavailable for a while."""

    def __init__(self, sqlite_path: Path | None, postgres_url: str | None) -> None:
        self._sqlite = sqlite_path
        self._postgres = postgres_url
        self._baseline = 0

    def prepare(self) -> None:
        """Wait for the service's table, and note how many rows an old run left (PostgreSQL)."""
        if self._sqlite is not None:
            wait_table(self._sqlite, timeout=30)
        else:
            wait_for(lambda: self._count_or_none() is not None, 30, "nexus_entries in PostgreSQL")
            self._baseline = self._count_or_none() or 0

    def delivered(self) -> int:
        return (self._count_or_none() or 0) - self._baseline

    def _count_or_none(self) -> int | None:
        if self._sqlite is not None:
            with contextlib.closing(sqlite3.connect(self._sqlite, timeout=10)) as conn:
                try:
                    row = conn.execute("SELECT count(*) FROM nexus_entries").fetchone()
                except sqlite3.OperationalError:
                    return None
            return int(row[0])
        import psycopg

        assert self._postgres is not None
        try:
            with psycopg.connect(self._postgres, connect_timeout=5) as conn:
                row = conn.execute("SELECT count(*) FROM nexus_entries").fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row is not None else None

    @contextlib.contextmanager
    def unavailable(self) -> Iterator[None]:
        """The destination cannot take writes while the block runs."""
        if self._sqlite is not None:
            with destination_locked(self._sqlite):
                yield
            return
        import psycopg

        assert self._postgres is not None
        with psycopg.connect(self._postgres) as conn, conn.transaction():
            conn.execute("LOCK TABLE nexus_entries IN ACCESS EXCLUSIVE MODE")
            yield


class Outages(threading.Thread):
    """Every `every` seconds, the destination is unavailable for `length` seconds."""

    def __init__(self, destination: Destination, every: float, length: float) -> None:
        super().__init__(name="soak-outages", daemon=True)
        self._destination = destination
        self._every = every
        self._length = length
        self._halt = threading.Event()
        self.active = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self._halt.wait(self._every):
            with self._destination.unavailable():
                self.active.set()
                self.count += 1
                self._halt.wait(self._length)
                self.active.clear()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


# -- looking ----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_bytes(root: Path) -> int:
    """The size of every file under `root`."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def third_medians(values: list[float]) -> tuple[float, float]:
    third = max(1, len(values) // 3)
    return statistics.median(values[:third]), statistics.median(values[-third:])


def limits_for(samples: list[Sample], config: SoakConfig) -> list[Limit]:
    """The three flatness checks, from the samples' first and last thirds."""
    rss_first, rss_last = third_medians([s.rss_bytes for s in samples])
    wal_first, wal_last = third_medians([s.wal_bytes for s in samples])
    lag_first, lag_last = third_medians([s.lag for s in samples])
    wal_slack = WAL_SEGMENTS_SLACK * config.wal_segment_bytes * config.workers
    lag_slack = config.rate * (config.outage_for + LAG_OUTAGE_SECONDS_SLACK)
    return [
        Limit("rss_bytes", rss_first, rss_last, rss_first * RSS_FACTOR + RSS_SLACK),
        Limit("wal_bytes", wal_first, wal_last, wal_first * WAL_FACTOR + wal_slack),
        Limit("lag", lag_first, lag_last, lag_first + lag_slack),
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the run ------------------------------------------------------------------------------------


def run_soak(config: SoakConfig, workdir: Path, *, progress: Callable[[str], None] | None = None) -> SoakResult:
    """Start gunicorn in `workdir`, soak it as `config` says, stop it; what was measured."""
    say = progress or (lambda _line: None)
    data_dir = workdir / "data"
    # INFO, as in production: a request line per write is part of the cost soaked, and
    # wait_ready counts the workers' wal_replayed lines.
    env = {"NEXUS_WAL_SEGMENT_BYTES": str(config.wal_segment_bytes)}
    if config.postgres_url is not None:
        env["NEXUS_DESTINATION_URL"] = config.postgres_url
    server: Gunicorn = start_gunicorn(data_dir, workdir / "gunicorn.log", workers=config.workers, env=env)
    try:
        server.wait_ready(timeout=60)
        destination = Destination(server.db_path if config.postgres_url is None else None, config.postgres_url)
        destination.prepare()
        return _soak(config, server, destination, say)
    finally:
        server.cleanup()


def _soak(config: SoakConfig, server: Gunicorn, destination: Destination, say: Callable[[str], None]) -> SoakResult:
    loader = Loader(server.port, config.rate, config.threads)
    outages = Outages(destination, config.outage_every, config.outage_for)
    samples: list[Sample] = []
    tick = threading.Event()  # never set: paces the samples
    say(f"{'t':>5} {'rss MiB':>8} {'per worker':>16} {'wal MiB':>8} {'acked':>8} {'delivered':>9} {'lag':>6}")
    loader.start()
    outages.start()
    started = time.monotonic()
    try:
        for k in itertools.count(1):
            due = started + k * config.sample_every
            if due > started + config.seconds + 1e-6:
                break
            tick.wait(max(0.0, due - time.monotonic()))
            samples.append(_sample(server, destination, loader, outages, time.monotonic() - started))
            s = samples[-1]
            say(
                f"{s.t:5.0f} {s.rss_bytes / MIB:8.1f} {'/'.join(f'{r / MIB:.0f}' for r in s.rss_per_worker):>16} "
                f"{s.wal_bytes / MIB:8.2f} {s.acked:8d} {s.delivered:9d} {s.lag:6d}{'  (outage)' if s.outage else ''}"
            )
    finally:
        loader.stop()
        outages.stop()
    elapsed = time.monotonic() - started
    settle_started = time.monotonic()
    settled = True
    try:
        wait_for(lambda: destination.delivered() >= loader.acked, SETTLE_TIMEOUT, "the backlog to clear")
    except AssertionError:
        settled = False
    seconds_to_settle = time.monotonic() - settle_started
    code, _ = server.stop(signal.SIGTERM)
    latencies = loader.latencies
    return SoakResult(
        config=config,
        samples=samples,
        limits=limits_for(samples, config),
        sent=loader.sent,
        acked=loader.acked,
        skipped=loader.skipped,
        statuses=dict(loader.statuses),
        errors=dict(loader.errors),
        achieved_rate=loader.sent / elapsed if elapsed > 0 else 0.0,
        delivered_at_end=destination.delivered(),
        settled=settled,
        seconds_to_settle=seconds_to_settle,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        stop_code=code,
        notes=[f"{outages.count} outages of {config.outage_for:g} s"],
    )


def _sample(server: Gunicorn, destination: Destination, loader: Loader, outages: Outages, t: float) -> Sample:
    workers = [pid for pid in children_of(server.pid) if is_alive(pid)]
    per_worker = [rss_bytes(pid) for pid in workers]
    acked = loader.acked
    delivered = destination.delivered()
    return Sample(
        t=round(t, 2),
        rss_bytes=sum(per_worker),
        rss_per_worker=per_worker,
        wal_bytes=tree_bytes(server.data_dir / "wal"),
        acked=acked,
        delivered=delivered,
        lag=max(0, acked - delivered),
        outage=outages.active.is_set(),
    )


def summary(result: SoakResult) -> str:
    """The verdict in a few lines: each flatness check, the load, the end state."""
    load = (
        f"offered {result.config.rate:g}/s for {result.config.seconds:g} s: sent {result.sent} "
        f"({result.achieved_rate:.0f}/s), acked {result.acked}, skipped {result.skipped}, "
        f"statuses {result.statuses}, errors {result.errors}, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms"
    )
    lines = [load]
    for limit in result.limits:
        scale = MIB if limit.metric.endswith("_bytes") else 1
        unit = " MiB" if scale == MIB else ""
        lines.append(
            f"{limit.metric}: first third {limit.first / scale:.2f}{unit}, last third {limit.last / scale:.2f}{unit}, "
            f"allowed {limit.allowed / scale:.2f}{unit}: {'flat' if limit.ok else 'GREW'}"
        )
    lines.append(
        f"after the load: {result.delivered_at_end} delivered, backlog "
        f"{'cleared' if result.settled else 'NOT cleared'} in {result.seconds_to_settle:.1f} s; "
        f"SIGTERM exit {result.stop_code}; {'; '.join(result.notes)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=500.0, help="offered writes per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8, help="client threads")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--outage-every", type=float, default=15.0)
    parser.add_argument("--outage-for", type=float, default=3.0)
    parser.add_argument("--wal-segment-bytes", type=int, default=MIB)
    parser.add_argument("--postgres-url", default=None, help="deliver to this PostgreSQL database instead")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        rate=args.rate,
        workers=args.workers,
        threads=args.threads,
        sample_every=args.sample_every,
        outage_every=args.outage_every,
        outage_for=args.outage_for,
        wal_segment_bytes=args.wal_segment_bytes,
        postgres_url=args.postgres_url,
    )
    with tempfile.TemporaryDirectory(prefix="nexus-soak-") as tmp:
        result = run_soak(config, Path(tmp), progress=lambda line: print(line, flush=True))
    print(summary(result))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.output, ROOT)}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
