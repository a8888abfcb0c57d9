"""Cheap metrics on the hot path: batched histograms and fast counters show what prometheus_client's own calls would."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from nexus_gevent.metrics import WAL_APPEND_BUCKETS, BatchedHistogram, FastCounter

#: Below the first bound, exactly on bounds (a bucket is "less than or equal"), between
#: bounds, and past the last one (+Inf).
VALUES = [0.0001, 0.0005, 0.0005, 0.001, 0.0015, 0.02, 0.3, 2.5, 7.0]


def samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `histogram` but its creation time, by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in histogram.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def pair() -> tuple[Histogram, Histogram]:
    """Two identical histograms in registries of their own: one observed directly, one batched."""
    direct = Histogram("h", "h", buckets=WAL_APPEND_BUCKETS, registry=CollectorRegistry())
    batched = Histogram("h", "h", buckets=WAL_APPEND_BUCKETS, registry=CollectorRegistry())
    return direct, batched


def test_published_batch_equals_direct_observations() -> None:
    """After publish(), every bucket, the count and the sum equal those of the same values observed directly."""
    direct, target = pair()
    batch = BatchedHistogram(target, WAL_APPEND_BUCKETS)

    for value in VALUES:
        direct.observe(value)
        batch.observe(value)
    batch.publish()

    assert samples(target) == samples(direct)


def test_nothing_shows_before_publish_and_nothing_is_counted_twice() -> None:
    """Observations wait for publish(); a second publish() adds only what was observed since."""
    direct, target = pair()
    batch = BatchedHistogram(target, WAL_APPEND_BUCKETS)
    empty = samples(target)

    batch.observe(0.003)
    assert samples(target) == empty

    batch.publish()
    batch.publish()
    batch.observe(0.04)
    batch.publish()
    direct.observe(0.003)
    direct.observe(0.04)

    assert samples(target) == samples(direct)


class TestFastCounter:
    """FastCounter: the cheap inc() writes exactly what prometheus_client's own would, where /metrics reads it."""

    @pytest.fixture
    def multiprocess(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """prometheus_client in multiprocess mode, its files in a folder of this test's own."""
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # type: ignore[no-untyped-call]
        return tmp_path

    def test_counts_reach_the_multiprocess_files_as_plain_inc_would(self, multiprocess: Path) -> None:
        """Counts through FastCounter and through the child's own inc() add up in the file /metrics reads."""
        counter = Counter("fast", "fast", ["source"], registry=None)
        fast = FastCounter(counter.labels("a"))

        fast.inc()
        fast.inc(2)
        counter.labels("a").inc(3)
        fast.inc()

        assert collected(multiprocess) == {("fast_total", (("source", "a"),)): 7.0}

    def test_counts_after_the_file_grows_still_land(self, multiprocess: Path) -> None:
        """A counter made before its file grew (new values remap it) still counts into the file."""
        counter = Counter("early", "early", ["n"], registry=None)
        fast = FastCounter(counter.labels("0"))
        file = counter.labels("0")._value._file
        mapping, n = file._m, 0
        while file._m is mapping:
            n += 1
            counter.labels(str(n)).inc()

        fast.inc(5)

        assert collected(multiprocess)[("early_total", (("n", "0"),))] == 5.0

    def test_without_multiprocess_mode_it_is_the_plain_counter(self) -> None:
        """Outside multiprocess mode FastCounter counts in the child itself."""
        registry = CollectorRegistry()
        counter = Counter("plain", "plain", registry=registry)
        fast = FastCounter(counter)

        fast.inc()
        fast.inc(4)

        assert registry.get_sample_value("plain_total") == 5.0


def collected(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample /metrics would show for the files in `directory`, by name and labels."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
