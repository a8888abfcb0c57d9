"""Prometheus metrics, aggregated over gunicorn workers by prometheus_client's multiprocess mode.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so every
worker writes its values to files there and /metrics sums them. Gauges of live
state use `livesum`, so a dead worker's last value drops out (child_exit marks it).
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, NamedTuple

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .entry import Entry
from .queue import Destination

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The spec's name (exposed with the `_total` suffix Prometheus gives every counter).
PROCESSED = Counter("bubblefish_queue_processing_rate", "Entries written to their destination (spec name).")
ACCEPTED = Counter("nexus_writes_accepted", "Writes acknowledged with 202.", ["source"])
DUPLICATES = Counter(
    "nexus_writes_duplicate",
    "Entries answered as duplicates (an idempotency key seen, or a resend within the shed window).",
    ["source"],
)
SHED = Counter("nexus_writes_shed", "Writes answered 429 because the queue was full.", ["source", "policy"])
RATE_LIMITED = Counter(
    "nexus_writes_rate_limited",
    "Writes answered 429 rate_limit_exceeded: the source was over its rate limit; nothing was stored.",
    ["source"],
)
WAL_FAILURES = Counter("nexus_wal_append_failures", "Writes answered 503 because the WAL could not make them durable.")
DELIVERED = Counter("nexus_delivered_entries", "Entries written to a destination.", ["destination"])
ATTEMPTS = Counter("nexus_delivery_attempts", "Destination writes tried, counted per entry.", ["destination"])
FAILURES = Counter(
    "nexus_delivery_failures", "Destination writes that failed, per entry, by kind.", ["destination", "kind"]
)
PERMANENT_FAILURES = Counter("nexus_permanent_failures", "Entries marked PERMANENT_FAILURE (dead letters).")
REPLAYED = Counter("nexus_replayed_entries", "PENDING entries found by WAL replay or orphan adoption.")
WAL_DAMAGE = Counter("nexus_wal_damaged_records", "Damaged WAL runs skipped at replay.")
WAL_APPEND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAL_APPEND_LATENCY = Histogram(
    "nexus_wal_append_latency_seconds",
    "Time from the WAL append call to its fsync covering the entry.",
    buckets=WAL_APPEND_BUCKETS,
)
DRAIN_DURATION = Histogram(
    "nexus_drain_duration_seconds", "How long a worker's drain took at exit.", buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30)
)
QUEUE_DEPTH = Gauge(
    "nexus_queue_depth", "Entries buffered in memory queues.", ["destination"], multiprocess_mode="livesum"
)
BACKLOG = Gauge(
    "nexus_backlog_entries",
    "Durable entries waiting for room in a queue (shed or overflow).",
    ["destination"],
    multiprocess_mode="livesum",
)
WAL_PENDING = Gauge("nexus_wal_pending_entries", "Entries PENDING in the WALs.", multiprocess_mode="livesum")
WAL_BYTES = Gauge("nexus_wal_size_bytes", "Bytes of WAL segments on disk.", multiprocess_mode="livesum")
DESTINATION_UP = Gauge(
    "nexus_destination_available",
    "1 while a destination answers, per worker.",
    ["destination"],
    multiprocess_mode="livemin",
)


class BatchedHistogram:
    """Observations counted in plain ints on the hot path, added to a histogram by `publish()`.

    In multiprocess mode every `observe()` takes a lock, checks the pid (a syscall)
    and writes two mmap values; once per write request that was 3 % of a worker's
    CPU. The service publishes once a second (and when it stops), so the histogram
    trails the writes by a second at most.
    """

    def __init__(self, histogram: Histogram, buckets: Sequence[float]) -> None:
        self._histogram = histogram
        self._bounds = tuple(buckets)
        # One slot per bound, plus +Inf: the layout of the histogram's own buckets.
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left puts a value equal
        # to a bound in that bound's bucket.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def publish(self) -> None:
        counts, self._counts = self._counts, [0] * len(self._counts)
        total, self._sum = self._sum, 0.0
        if not any(counts):
            return
        # prometheus_client has no public call to add n observations to a bucket; its
        # per-bucket values (`_buckets`, non-cumulative) and `_sum` are stable across
        # releases; tests/test_metrics.py compares the result with observe()'s.
        buckets = self._histogram._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
        self._histogram._sum.inc(total)


#: The write path observes here; the service's gauge loop publishes it.
WAL_APPEND_LATENCY_BATCH = BatchedHistogram(WAL_APPEND_LATENCY, WAL_APPEND_BUCKETS)


#: A multiprocess value as prometheus_client stores it: a float, then its timestamp.
_VALUE_LAYOUT = struct.Struct("dd")
#: Set in a child forked after counters were made: their cached files belong to the parent.
_forked = False


def _after_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork)


class FastCounter:
    """A counter (child) whose inc() adds to a float and stores it in this worker's metrics file.

    In multiprocess mode prometheus_client's own inc() takes a lock and calls
    os.getpid() (a syscall, to notice a fork) on every call: about 1.7 µs, and with
    three to four counts a write it was about 5 % of a write's CPU in the worker. Every
    count of the service happens on the hub thread, so the lock guards nothing, and a
    fork is noticed once by os.register_at_fork rather than asked on every call: after
    one, counts go through prometheus_client again, which moves them to the child's file.

    The value is the same one prometheus_client keeps (its `_value`, in the same file
    slot), so its own inc() on the same child stays consistent, and /metrics still sums
    every worker's file. Outside multiprocess mode (tests, the CLI) it is plain inc().
    """

    __slots__ = ("_child", "_file", "_position", "_value")

    def __init__(self, child: Counter) -> None:
        self._child = child
        value: Any = getattr(child, "_value", None)
        self._value: Any = None
        if getattr(value, "_multiprocess", False):
            # The slot exists from the value's creation on (it reads its initial value).
            self._value = value
            self._file: Any = value._file
            self._position: int = value._file._positions[value._key]

    def inc(self, amount: float = 1) -> None:
        value = self._value
        if value is None or _forked:
            self._child.inc(amount)
            return
        total = value._value + amount
        value._value = total
        # The file's mmap is replaced when it grows: look it up each time.
        _VALUE_LAYOUT.pack_into(self._file._m, self._position, total, 0.0)


class WriteCounters(NamedTuple):
    """One source's counters of write outcomes."""

    accepted: FastCounter
    duplicate: FastCounter
    shed: FastCounter
    rate_limited: FastCounter


def write_counters(sources: Sequence[str], policy: str) -> dict[str, WriteCounters]:
    """Accepted, duplicate, shed and rate-limited counters per source, looked up once.

    `labels()` takes a lock and builds a key on every call (6 % of a 429's CPU);
    creating the children up front also shows every source at 0 before its first write.
    """
    return {
        source: WriteCounters(
            FastCounter(ACCEPTED.labels(source)),
            FastCounter(DUPLICATES.labels(source)),
            FastCounter(SHED.labels(source, policy)),
            FastCounter(RATE_LIMITED.labels(source)),
        )
        for source in sources
    }


def render() -> bytes:
    """The Prometheus text of every worker (or of this process, outside gunicorn)."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


class MeteredDestination:
    """Counts attempts and failures around a destination, so the queue need not know metrics."""

    def __init__(self, inner: Destination, classify_failure: type[Exception]) -> None:
        self._inner = inner
        self._outage = classify_failure
        self._attempts = FastCounter(ATTEMPTS.labels(inner.name))
        self._delivered = FastCounter(DELIVERED.labels(inner.name))
        self._outages = FastCounter(FAILURES.labels(inner.name, "unavailable"))
        self._rejects = FastCounter(FAILURES.labels(inner.name, "entry"))

    @property
    def name(self) -> str:
        return self._inner.name

    def write(self, entries: Sequence[Entry]) -> None:
        self._attempts.inc(len(entries))
        try:
            self._inner.write(entries)
        except self._outage:
            self._outages.inc(len(entries))
            raise
        except Exception:
            self._rejects.inc(len(entries))
            raise
        self._delivered.inc(len(entries))

    def probe(self) -> None:
        self._inner.probe()

    def close(self) -> None:
        self._inner.close()
