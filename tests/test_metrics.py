"""BatchedHistogram: observations counted in plain ints publish exactly what observe() would have."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from nexus_gevent.metrics import WAL_APPEND_BUCKETS, BatchedHistogram

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
