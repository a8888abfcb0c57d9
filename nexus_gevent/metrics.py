"""Prometheus metrics, aggregated over gunicorn workers by prometheus_client's multiprocess mode.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so every
worker writes its values to files there and /metrics sums them. Gauges of live
state use `livesum`, so a dead worker's last value drops out (child_exit marks it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
from .ports import Destination

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: The spec's name (exposed with the `_total` suffix Prometheus gives every counter).
PROCESSED = Counter("bubblefish_queue_processing_rate", "Entries written to their destination (spec name).")
ACCEPTED = Counter("nexus_writes_accepted", "Writes acknowledged with 202.", ["source"])
DUPLICATES = Counter("nexus_writes_duplicate", "Writes answered 200 duplicate (Idempotency-Key seen).", ["source"])
SHED = Counter("nexus_writes_shed", "Writes answered 429 because the queue was full.", ["source", "policy"])
WAL_FAILURES = Counter("nexus_wal_append_failures", "Writes answered 503 because the WAL could not make them durable.")
DELIVERED = Counter("nexus_delivered_entries", "Entries written to a destination.", ["destination"])
ATTEMPTS = Counter("nexus_delivery_attempts", "Destination writes tried, counted per entry.", ["destination"])
FAILURES = Counter(
    "nexus_delivery_failures", "Destination writes that failed, per entry, by kind.", ["destination", "kind"]
)
PERMANENT_FAILURES = Counter("nexus_permanent_failures", "Entries marked PERMANENT_FAILURE (dead letters).")
REPLAYED = Counter("nexus_replayed_entries", "PENDING entries found by WAL replay or orphan adoption.")
WAL_DAMAGE = Counter("nexus_wal_damaged_records", "Damaged WAL runs skipped at replay.")
WAL_APPEND_LATENCY = Histogram(
    "nexus_wal_append_latency_seconds",
    "Time from the WAL append call to its fsync covering the entry.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
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
        self._attempts = ATTEMPTS.labels(inner.name)
        self._delivered = DELIVERED.labels(inner.name)
        self._outages = FAILURES.labels(inner.name, "unavailable")
        self._rejects = FAILURES.labels(inner.name, "entry")

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def inner(self) -> Destination:
        return self._inner

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
