"""The bounded queue between the WAL and a destination (spec: queue-package-doc.txt).

Each class is one family of the spec's promises; each docstring names the promise.
The tests run on gevent primitives without monkey-patching, and synchronise on
events, joins and `wait_until`, never on a bare sleep.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_gevent import queue as queue_module
from nexus_gevent.entry import Entry
from nexus_gevent.errors import LoadShed, QueueClosed
from nexus_gevent.queue import DEFAULT_SIZE, DEFAULT_WORKERS, Queue, QueueConfig
from nexus_gevent.testing import (
    RecordingDestination,
    RecordingLogger,
    RecordingUpdater,
    make_entry,
    wait_until,
)

#: Fast defaults: a retry waits milliseconds, a probe too.
FAST = QueueConfig(initial_backoff=0.01, probe_initial=0.005, probe_max=0.02)
#: Timers may fire a little early against time.monotonic(): lower bounds allow this much.
TIMER_SLACK = 0.8


@dataclass
class Harness:
    """One queue wired to recording doubles."""

    queue: Queue
    destination: RecordingDestination
    updater: RecordingUpdater
    logger: RecordingLogger

    def enqueue_new(self, count: int, payload: bytes = b'{"n": 1}') -> list[Entry]:
        """Enqueue `count` fresh entries (no yield in between) and return them."""
        entries = [make_entry(payload=payload) for _ in range(count)]
        for entry in entries:
            self.queue.enqueue(entry)
        return entries

    def stall_writes(self, count: int, *, in_flight: int = 1) -> list[Entry]:
        """Stall the destination, enqueue `count` fresh entries, and wait until `in_flight` writes hold some of them."""
        self.destination.stall()
        entries = self.enqueue_new(count)
        wait_until(lambda: self.destination.in_flight == in_flight)
        return entries

    def stop(self) -> bool:
        """Let every double run free again, then drain."""
        self.destination.release()
        self.destination.come_back()
        return self.queue.drain(timeout=5.0)


def start_harness(**overrides: Any) -> Harness:
    destination = RecordingDestination()
    updater = RecordingUpdater()
    logger = RecordingLogger()
    config = dataclasses.replace(FAST, **overrides)
    return Harness(Queue(config, logger, destination, updater), destination, updater, logger)


@pytest.fixture
def start() -> Iterator[Callable[..., Harness]]:
    """Start harnesses; each is drained at teardown so no greenlet outlives its test."""
    started: list[Harness] = []

    def _start(**overrides: Any) -> Harness:
        harness = start_harness(**overrides)
        started.append(harness)
        return harness

    yield _start
    for harness in started:
        assert harness.stop(), "a queue did not drain at teardown"


def ids(entries: list[Entry]) -> list[str]:
    return [e.payload_id for e in entries]


class TestConstruction:
    """A queue refuses missing collaborators and falls back to the spec's defaults."""

    def test_none_logger_is_refused(self) -> None:
        """Spec: a nil logger at construction fails at once with a clear message."""
        with pytest.raises(TypeError, match="logger must not be None"):
            Queue(FAST, None, RecordingDestination(), RecordingUpdater())  # type: ignore[arg-type]

    def test_none_destination_is_refused(self) -> None:
        """A None destination is refused at construction with a clear message."""
        with pytest.raises(TypeError, match="destination must not be None"):
            Queue(FAST, RecordingLogger(), None, RecordingUpdater())  # type: ignore[arg-type]

    def test_none_updater_is_refused(self) -> None:
        """A None WAL updater is refused at construction with a clear message."""
        with pytest.raises(TypeError, match="updater must not be None"):
            Queue(FAST, RecordingLogger(), RecordingDestination(), None)  # type: ignore[arg-type]

    @pytest.mark.parametrize("size", [0, -1])
    def test_non_positive_size_means_default_capacity(self, start: Callable[..., Harness], size: int) -> None:
        """Spec: Size of 0 or less falls back to defaultSize (10 000) buffered entries."""
        # Given: one worker stalled on its first entry
        h = start(size=size, workers=1, batch_max=1)
        h.stall_writes(1)
        # When / Then: exactly DEFAULT_SIZE more fit, and the next is shed
        assert h.queue.capacity == DEFAULT_SIZE == 10_000
        h.enqueue_new(DEFAULT_SIZE)
        with pytest.raises(LoadShed):
            h.queue.enqueue(make_entry())

    @pytest.mark.parametrize("workers", [0, -2])
    def test_non_positive_workers_means_default_workers(self, start: Callable[..., Harness], workers: int) -> None:
        """Workers of 0 or less falls back to DEFAULT_WORKERS delivery greenlets."""
        # Given: a stalled destination and more single-entry batches than workers
        h = start(workers=workers, batch_max=1)
        h.destination.stall()
        h.enqueue_new(DEFAULT_WORKERS + 3)
        # When: every runnable greenlet has run
        wait_until(lambda: h.destination.in_flight == DEFAULT_WORKERS)
        gevent.idle()
        # Then: exactly DEFAULT_WORKERS writes are in flight, the rest wait in the buffer
        assert h.destination.in_flight == h.destination.max_in_flight == DEFAULT_WORKERS
        assert h.queue.depth == 3


class TestEnqueue:
    """Enqueue never blocks nor yields; a full queue sheds load."""

    def test_full_queue_sheds_load_at_once(self, start: Callable[..., Harness]) -> None:
        """Spec: a full queue returns ErrLoadShed immediately and does not buffer the entry."""
        # Given: the only worker is stalled and the buffer is full
        h = start(size=3, workers=1, batch_max=1)
        h.stall_writes(1)
        h.enqueue_new(3)
        assert h.queue.free_slots == 0
        # When: one more arrives
        shed = make_entry()
        with pytest.raises(LoadShed, match="channel full, load shed"):
            h.queue.enqueue(shed)
        # Then: it is not held; the WAL keeps it PENDING
        assert not h.queue.holds(shed.payload_id)
        assert h.queue.depth == 3

    def test_enqueue_never_yields_to_other_greenlets(self, start: Callable[..., Harness]) -> None:
        """Spec: Enqueue is non-blocking; on the hub that means it never switches greenlets."""
        # Given: a stalled worker and a greenlet that is ready to run
        h = start(size=5, workers=1, batch_max=1)
        h.stall_writes(1)
        ran: list[bool] = []
        gevent.spawn(ran.append, True)
        # When: we fill the queue and overflow it
        h.enqueue_new(5)
        for _ in range(3):
            with pytest.raises(LoadShed):
                h.queue.enqueue(make_entry())
        # Then: the other greenlet never got the CPU, until we yield ourselves
        assert ran == []
        gevent.idle()
        assert ran == [True]

    def test_enqueue_after_drain_is_refused(self, start: Callable[..., Harness]) -> None:
        """A drained queue takes no new entries: enqueue raises QueueClosed."""
        h = start()
        assert h.queue.drain() is True
        with pytest.raises(QueueClosed):
            h.queue.enqueue(make_entry())

    def test_same_payload_id_is_buffered_once(self, start: Callable[..., Harness]) -> None:
        """An entry already buffered or in flight is not buffered a second time."""
        # Given: one entry in flight and one buffered
        h = start(workers=1, batch_max=1)
        (in_flight,) = h.stall_writes(1)
        buffered = make_entry()
        h.queue.enqueue(buffered)
        # When: both are enqueued again
        h.queue.enqueue(in_flight)
        h.queue.enqueue(buffered)
        # Then: the buffer holds one copy, and each is written once
        assert h.queue.depth == 1
        h.destination.release()
        assert h.queue.drain() is True
        assert h.destination.delivered == ids([in_flight, buffered])


class TestDrain:
    """Drain is once-guarded, delivers what is buffered, and honours its deadline."""

    def test_drain_is_idempotent_across_calls_and_greenlets(self, start: Callable[..., Harness]) -> None:
        """Spec: Drain may be called any number of times, concurrently; it never fails."""
        # Given: two workers stalled mid-write, three entries buffered
        h = start(workers=2, batch_max=1)
        entries = h.stall_writes(5, in_flight=2)
        # When: fifteen greenlets drain at once, with and without a deadline
        drains = [gevent.spawn(h.queue.drain) for _ in range(10)]
        drains += [gevent.spawn(h.queue.drain, 5.0) for _ in range(5)]
        gevent.idle()
        assert not any(g.ready() for g in drains)
        h.destination.release()
        gevent.joinall(drains, timeout=5.0, raise_error=True)
        # Then: every call reports a finished drain, and so do later ones
        assert [g.value for g in drains] == [True] * 15
        assert h.queue.drain() is True
        assert h.queue.drain(timeout=0) is True
        assert Counter(h.destination.delivered) == Counter(ids(entries))
        assert Counter(h.updater.delivered_ids) == Counter(ids(entries))
        assert h.logger.at("exception") == []

    def test_drain_delivers_everything_buffered_first(self, start: Callable[..., Harness]) -> None:
        """Drain without a deadline waits for every worker; buffered entries are delivered first."""
        # Given: a slow destination working through 100 entries
        h = start(workers=2, batch_max=5)
        h.destination.write_delay = 0.002
        entries = h.enqueue_new(100)
        wait_until(lambda: len(h.destination.delivered) > 0)
        # When
        assert h.queue.drain() is True
        # Then: all of them were written and marked, once
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert sorted(h.updater.delivered_ids) == sorted(ids(entries))

    def test_drain_delivers_entries_enqueued_just_before_it(self, start: Callable[..., Harness]) -> None:
        """Entries enqueued while the workers sleep in get(), just before drain, are still delivered."""
        # Given: idle workers waiting for work
        h = start(workers=2)
        gevent.idle()
        # When: entries arrive and drain follows without a yield in between
        entries = h.enqueue_new(5)
        assert h.queue.drain() is True
        # Then: the buffered entries were delivered, not stranded
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert not any(h.queue.holds(pid) for pid in ids(entries))

    def test_drain_timeout_returns_false_and_workers_stop_after_current_batch(
        self, start: Callable[..., Harness]
    ) -> None:
        """Spec: DrainWithContext returns false when the deadline passes; workers then stop after their item."""
        # Given: the only worker is stalled on the first of four entries
        h = start(workers=1, batch_max=1)
        entries = h.stall_writes(4)
        # When: a drain's deadline passes first
        began = time.monotonic()
        assert h.queue.drain(timeout=0.05) is False
        assert time.monotonic() - began >= 0.05 * TIMER_SLACK
        # Then: once the write finishes the worker stops, and a later drain reports it
        h.destination.release()
        assert h.queue.drain() is True
        assert h.destination.delivered == [entries[0].payload_id]
        assert h.updater.delivered_ids == [entries[0].payload_id]
        # The three entries never taken stay PENDING: neither written nor marked.
        assert h.updater.failure_marks == []

    def test_drain_cuts_backoff_short_and_leaves_entry_pending(self, start: Callable[..., Harness]) -> None:
        """A drain during a backoff wait ends it at once and leaves the entry unmarked (PENDING)."""
        # Given: an entry waiting 10 s before its second attempt
        h = start(initial_backoff=10.0, max_attempts=5)
        entry = make_entry()
        h.destination.poison(entry.payload_id)
        h.queue.enqueue(entry)
        wait_until(lambda: len(h.destination.calls) == 1)
        # When: the drain's 2 s deadline is far shorter than the backoff
        assert h.queue.drain(timeout=2.0) is True
        # Then: the entry was abandoned, neither delivered nor dead-lettered
        assert len(h.destination.calls) == 1
        assert h.destination.delivered == []
        assert h.updater.delivered_ids == []
        assert h.updater.failure_marks == []
        assert "retry_abandoned_by_drain" in h.logger.events("info")


class TestRetry:
    """Transient failures are logged at WARN and retried with backoff; then the entry is dead-lettered."""

    def test_failed_write_is_logged_at_warn_and_retried_with_doubling_backoff(
        self, start: Callable[..., Harness]
    ) -> None:
        """Spec: workers log failures at WARN and retry after initial, 2x and 4x initial."""
        # Given: an entry that fails three times
        h = start(initial_backoff=0.05, max_attempts=5)
        entry = make_entry()
        h.destination.fail(entry.payload_id, times=3)
        # When
        h.queue.enqueue(entry)
        wait_until(lambda: h.destination.delivered == [entry.payload_id])
        # Then: four attempts, each gap at least double the one before
        times = [c.at for c in h.destination.calls_for(entry.payload_id)]
        assert len(times) == 4
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, expected in zip(gaps, [0.05, 0.1, 0.2], strict=True):
            assert gap >= expected * TIMER_SLACK, (gaps, expected)
        warned = [r for r in h.logger.at("warning") if r.event == "delivery_failed"]
        assert len(warned) == 3
        assert all(r.fields["payload_ids"] == [entry.payload_id] for r in warned)
        assert h.updater.failure_marks == []

    def test_entry_is_dead_lettered_after_max_attempts_and_not_written_again(
        self, start: Callable[..., Harness]
    ) -> None:
        """Spec: after maxDeliveryAttempts the entry is marked PERMANENT_FAILURE and dropped."""
        # Given: an entry that always fails
        h = start(max_attempts=3, initial_backoff=0.005)
        entry = make_entry()
        h.destination.poison(entry.payload_id)
        # When
        h.queue.enqueue(entry)
        wait_until(lambda: len(h.updater.failure_marks) == 1)
        assert h.queue.drain() is True
        # Then: marked once, with its attempts, and never written again
        (dead,) = h.updater.failure_marks
        assert dead.entry == entry
        assert dead.attempts == 3
        assert entry.payload_id in dead.error
        assert len(h.destination.calls_for(entry.payload_id)) == 3
        assert h.updater.delivered_ids == []
        assert not h.queue.holds(entry.payload_id)
        assert "entry_dead_lettered" in h.logger.events("error")

    @pytest.mark.parametrize("payload", [b"not json", b"[1,2]", b'"a string"'])
    def test_undecodable_payload_is_dead_lettered_at_once(self, start: Callable[..., Harness], payload: bytes) -> None:
        """A payload that is not a JSON object is marked PERMANENT_FAILURE at once, attempts 1, never written."""
        # Given: a bad entry between two good ones
        h = start()
        good_before, bad, good_after = make_entry(), make_entry(payload=payload), make_entry()
        # When
        for entry in (good_before, bad, good_after):
            h.queue.enqueue(entry)
        assert h.queue.drain() is True
        # Then
        (dead,) = h.updater.failure_marks
        assert dead.entry == bad
        assert dead.attempts == 1
        assert h.destination.calls_for(bad.payload_id) == []
        assert sorted(h.destination.delivered) == sorted(ids([good_before, good_after]))

    def test_dead_letter_carries_its_own_last_error(self, start: Callable[..., Harness]) -> None:
        """Each dead letter records the last error of its own entry, not of a neighbour's."""
        # Given: two poison entries written in the same batch
        h = start(workers=1, max_attempts=2, initial_backoff=0.001)
        first, second = make_entry(), make_entry()
        h.destination.poison(first.payload_id, second.payload_id)
        # When
        h.queue.enqueue(first)
        h.queue.enqueue(second)
        wait_until(lambda: len(h.updater.failure_marks) == 2)
        # Then
        errors = {d.entry.payload_id: d.error for d in h.updater.failure_marks}
        assert first.payload_id in errors[first.payload_id]
        assert second.payload_id in errors[second.payload_id]

    def test_failed_dead_letter_mark_is_logged_at_error_and_delivery_goes_on(
        self, start: Callable[..., Harness]
    ) -> None:
        """When the WAL cannot record a dead letter it is logged at ERROR (it may be lost); delivery goes on."""
        h = start(max_attempts=1)
        h.updater.fail_mark_permanent_failure = True
        poison, healthy = make_entry(), make_entry()
        h.destination.poison(poison.payload_id)
        h.queue.enqueue(poison)
        wait_until(lambda: "dead_letter_mark_failed" in h.logger.events("error"))
        h.queue.enqueue(healthy)
        assert h.queue.drain() is True
        assert h.destination.delivered == [healthy.payload_id]


class TestBatching:
    """Waiting entries share one write; a poison entry cannot hold back its neighbours."""

    def test_waiting_entries_are_written_in_batches_of_at_most_batch_max(self, start: Callable[..., Harness]) -> None:
        """Entries that wait together are written in one call, batch_max at a time."""
        # Given: seven entries pile up behind a stalled write
        h = start(workers=1, batch_max=3)
        entries = h.stall_writes(1)
        entries += h.enqueue_new(7)
        # When
        h.destination.release()
        wait_until(lambda: len(h.destination.delivered) == 8)
        # Then
        pids = ids(entries)
        assert h.destination.batches == [tuple(pids[0:1]), tuple(pids[1:4]), tuple(pids[4:7]), tuple(pids[7:8])]

    def test_entries_arriving_during_the_linger_share_the_first_ones_write(self, start: Callable[..., Harness]) -> None:
        """With a linger, a worker woken by one entry waits for more and writes them all at once, in order."""
        # Given: the worker woke for the first entry and lingers (idle: nothing else can
        # run; enqueue never yields, so the linger cannot end before the rest are in)
        h = start(workers=1, linger=0.2)
        entries = h.enqueue_new(1)
        gevent.idle()
        # When
        entries += h.enqueue_new(5)
        wait_until(lambda: len(h.destination.delivered) == 6)
        # Then
        assert h.destination.batches == [tuple(ids(entries))]

    def test_lingering_workers_keep_the_queue_order(self, start: Callable[..., Harness]) -> None:
        """Several workers lingering over entries that trickle in still store them in the order they came."""
        h = start(workers=4, linger=0.2)
        entries: list[Entry] = []
        for _ in range(8):
            entries += h.enqueue_new(1)
            gevent.idle()  # every worker that can wake has woken and lingers
        wait_until(lambda: len(h.destination.delivered) == 8)
        assert h.destination.delivered == ids(entries)

    def test_a_full_batch_is_written_without_lingering(self, start: Callable[..., Harness]) -> None:
        """A worker that can fill a whole batch at once writes it at once, whatever the linger."""
        h = start(workers=1, batch_max=3, linger=60)
        entries = h.enqueue_new(3)
        wait_until(lambda: len(h.destination.delivered) == 3, timeout=10)
        assert h.destination.batches == [tuple(ids(entries))]

    def test_a_worker_finding_enough_entries_waiting_does_not_linger(
        self, start: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Under a steady heavy load (LINGER_ENOUGH entries already buffered) a worker writes at once."""
        monkeypatch.setattr(queue_module, "LINGER_ENOUGH", 5)
        h = start(workers=1, linger=60)
        entries = h.enqueue_new(5)
        wait_until(lambda: len(h.destination.delivered) == 5, timeout=10)
        assert h.destination.batches == [tuple(ids(entries))]

    def test_a_drain_ends_the_linger_and_delivers_at_once(self, start: Callable[..., Harness]) -> None:
        """A drain does not wait out a linger: what is buffered is written and the drain returns in time."""
        h = start(workers=1, linger=60)
        entries = h.enqueue_new(1)
        gevent.idle()
        assert h.destination.delivered == []
        assert h.queue.drain(timeout=10)
        assert h.destination.delivered == ids(entries)

    def test_poison_entry_does_not_hold_back_healthy_neighbours(self, start: Callable[..., Harness]) -> None:
        """A failed batch is split at once: healthy neighbours are delivered without a backoff wait."""
        # Given: five entries in one batch, the middle one poison, a 5 s backoff
        h = start(workers=1, batch_max=10, initial_backoff=5.0, max_attempts=3)
        entries = [make_entry() for _ in range(5)]
        poison = entries[2]
        healthy = {e.payload_id for e in entries} - {poison.payload_id}
        h.destination.poison(poison.payload_id)
        for entry in entries:
            h.queue.enqueue(entry)
        # When / Then: the healthy four arrive long before any backoff could end
        wait_until(lambda: set(h.destination.delivered) == healthy, timeout=1.0)
        assert h.destination.calls[0].payload_ids == tuple(ids(entries))
        assert h.destination.calls[0].outcome == "rejected"
        assert h.updater.failure_marks == []
        assert h.queue.drain(timeout=2.0) is True
        assert set(h.updater.delivered_ids) == healthy

    def test_only_the_poison_entry_is_dead_lettered_after_max_attempts_writes(
        self, start: Callable[..., Harness]
    ) -> None:
        """Only the entry that fails alone ends PERMANENT_FAILURE; its batch write counts, so writes equal attempts."""
        # Given: a batch of five with one poison entry
        h = start(workers=1, batch_max=10, max_attempts=3, initial_backoff=0.001)
        entries = [make_entry() for _ in range(5)]
        poison = entries[2]
        h.destination.poison(poison.payload_id)
        # When
        for entry in entries:
            h.queue.enqueue(entry)
        wait_until(lambda: len(h.updater.failure_marks) == 1)
        assert h.queue.drain() is True
        # Then: the batch write was its first attempt, two writes alone the others
        (dead,) = h.updater.failure_marks
        assert (dead.entry, dead.attempts) == (poison, 3)
        calls = h.destination.calls_for(poison.payload_id)
        assert [len(c.payload_ids) for c in calls] == [5, 1, 1]
        attempts = [r.fields["attempt"] for r in h.logger.at("warning") if poison.payload_id in r.fields["payload_ids"]]
        assert attempts == [1, 2, 3]
        healthy = [pid for pid in ids(entries) if pid != poison.payload_id]
        assert sorted(h.destination.delivered) == sorted(healthy)
        assert sorted(h.updater.delivered_ids) == sorted(healthy)


class TestRetrySchedule:
    """An entry waiting for its next attempt holds no delivery greenlet."""

    def test_a_poison_entry_in_backoff_does_not_delay_healthy_entries(self, start: Callable[..., Harness]) -> None:
        """With one worker and a 10 s backoff running, later healthy entries are delivered at once."""
        # Given: one worker, and a poison entry that failed its first attempt
        h = start(workers=1, initial_backoff=10.0, max_attempts=3)
        poison = make_entry()
        h.destination.poison(poison.payload_id)
        h.queue.enqueue(poison)
        wait_until(lambda: h.queue.retrying == 1, what="the poison entry waiting for its second attempt")
        # When: healthy entries arrive while it waits
        healthy = h.enqueue_new(5)
        # Then: they are delivered long before its backoff could end, and it is still owed
        wait_until(lambda: set(h.destination.delivered) == set(ids(healthy)), timeout=2.0)
        assert h.queue.holds(poison.payload_id)
        assert len(h.destination.calls_for(poison.payload_id)) == 1

    def test_more_poison_entries_than_workers_leave_the_line_moving(self, start: Callable[..., Harness]) -> None:
        """Four poison entries in backoff on two workers: a healthy entry still goes straight through."""
        h = start(workers=2, batch_max=1, initial_backoff=10.0, max_attempts=3)
        poisons = [make_entry() for _ in range(4)]
        h.destination.poison(*ids(poisons))
        for entry in poisons:
            h.queue.enqueue(entry)
        wait_until(lambda: h.queue.retrying == 4, what="all four poison entries in backoff")
        (healthy,) = h.enqueue_new(1)
        wait_until(lambda: h.destination.delivered == [healthy.payload_id], timeout=2.0)

    def test_an_entry_in_backoff_is_still_outstanding_and_never_queued_twice(
        self, start: Callable[..., Harness]
    ) -> None:
        """While it waits, the entry counts as owed (Retry-After) and enqueueing it again adds nothing."""
        h = start(workers=1, initial_backoff=10.0, max_attempts=3)
        entry = make_entry()
        h.destination.poison(entry.payload_id)
        h.queue.enqueue(entry)
        wait_until(lambda: h.queue.retrying == 1)
        h.queue.enqueue(entry)
        assert (h.queue.outstanding, h.queue.depth) == (1, 0)

    def test_each_poison_entry_ends_after_exactly_max_attempts_on_the_spec_schedule(
        self, start: Callable[..., Harness]
    ) -> None:
        """Three poison entries retried side by side: each is written max_attempts times, gaps doubling."""
        h = start(workers=1, batch_max=1, initial_backoff=0.05, max_attempts=4)
        poisons = [make_entry() for _ in range(3)]
        h.destination.poison(*ids(poisons))
        for entry in poisons:
            h.queue.enqueue(entry)
        wait_until(lambda: len(h.updater.failure_marks) == 3)
        assert sorted((d.entry.payload_id, d.attempts) for d in h.updater.failure_marks) == sorted(
            (pid, 4) for pid in ids(poisons)
        )
        for entry in poisons:
            times = [c.at for c in h.destination.calls_for(entry.payload_id)]
            assert len(times) == 4
            gaps = [b - a for a, b in itertools.pairwise(times)]
            for gap, expected in zip(gaps, [0.05, 0.1, 0.2], strict=True):
                assert gap >= expected * TIMER_SLACK, (gaps, expected)


class TestDeliveredWriteBack:
    """Delivered ids go back to the WAL in batches: at 50 ids, after 100 ms, and at exit."""

    def test_every_delivered_id_is_marked_exactly_once_in_batches(self, start: Callable[..., Harness]) -> None:
        """Every delivered id is marked DELIVERED exactly once, in fewer calls than entries."""
        h = start(workers=2, batch_max=1)
        h.destination.write_delay = 0  # yield on every write, so the marker runs in between
        entries = h.enqueue_new(200)
        assert h.queue.drain() is True
        assert Counter(h.updater.delivered_ids) == Counter(ids(entries))
        assert len(h.updater.delivered_marks) < len(entries)

    def test_fifty_delivered_ids_are_written_back_without_waiting_for_the_interval(
        self, start: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Spec numbers: 50 delivered ids are written back at once, whatever the interval."""
        # Given: an interval too long to matter
        monkeypatch.setattr(queue_module, "ACK_FLUSH_INTERVAL", 60.0)
        h = start(workers=1, batch_max=1)
        h.destination.write_delay = 0
        # When: exactly ACK_FLUSH_COUNT entries are delivered
        entries = h.enqueue_new(queue_module.ACK_FLUSH_COUNT)
        # Then: they are marked in one call
        wait_until(lambda: len(h.updater.delivered_marks) == 1)
        assert h.updater.delivered_marks[0].payload_ids == tuple(ids(entries))

    def test_a_lone_delivered_id_is_written_back_after_the_interval(self, start: Callable[..., Harness]) -> None:
        """Spec numbers: fewer than 50 delivered ids are written back after about 100 ms."""
        h = start()
        entry = make_entry()
        h.queue.enqueue(entry)
        wait_until(lambda: len(h.updater.delivered_marks) == 1, timeout=1.0)
        (mark,) = h.updater.delivered_marks
        assert mark.payload_ids == (entry.payload_id,)
        # It waited for the interval to gather more, rather than writing back at once.
        written = h.destination.calls_for(entry.payload_id)[0].at
        assert mark.at - written >= queue_module.ACK_FLUSH_INTERVAL * TIMER_SLACK

    def test_drain_writes_back_the_rest(self, start: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
        """Spec numbers: delivered ids not yet written back are written back when the workers exit."""
        # Given: three delivered entries, and an interval too long to flush them
        monkeypatch.setattr(queue_module, "ACK_FLUSH_INTERVAL", 60.0)
        h = start()
        entries = h.enqueue_new(3)
        wait_until(lambda: len(h.destination.delivered) == 3)
        assert h.updater.delivered_marks == []
        # When
        assert h.queue.drain() is True
        # Then
        assert h.updater.delivered_ids == ids(entries)

    def test_ids_delivered_during_a_slow_write_back_are_written_back_at_exit(
        self, start: Callable[..., Harness]
    ) -> None:
        """Ids delivered while a write-back is in progress are still written back when the workers exit."""
        # Given: the first write-back is stuck in a slow WAL
        h = start(workers=1)
        h.updater.stall()
        first = make_entry()
        h.queue.enqueue(first)
        wait_until(lambda: h.updater.marking == 1)
        # And: a second entry is delivered meanwhile
        second = make_entry()
        h.queue.enqueue(second)
        wait_until(lambda: len(h.destination.delivered) == 2)
        # When: the drain stops the workers before the write-back returns
        drain = gevent.spawn(h.queue.drain)
        gevent.idle()
        h.updater.release()
        # Then: both ids are marked, the second by the final write-back
        assert drain.get(timeout=5.0) is True
        assert h.updater.delivered_ids == ids([first, second])

    def test_failed_write_back_is_logged_at_warn_and_delivery_goes_on(self, start: Callable[..., Harness]) -> None:
        """Spec numbers: a failed write-back is logged at WARN and nothing else happens."""
        h = start()
        h.updater.fail_mark_delivered = True
        entries = h.enqueue_new(3)
        assert h.queue.drain() is True
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert "delivered_writeback_failed" in h.logger.events("warning")
        assert h.logger.at("error") == h.logger.at("exception") == []


class TestCallbacks:
    """OnProcessed and OnDelivered follow each successful write; their failures stay theirs."""

    def test_on_processed_is_called_once_per_delivered_entry(self, start: Callable[..., Harness]) -> None:
        """Spec: OnProcessed is invoked after each entry is successfully written."""
        processed: list[None] = []
        h = start(on_processed=lambda: processed.append(None), max_attempts=1)
        poison = make_entry()
        h.destination.poison(poison.payload_id)
        h.queue.enqueue(poison)
        h.enqueue_new(7)
        assert h.queue.drain() is True
        assert len(processed) == 7

    def test_on_delivered_receives_destination_name_once_per_entry(self, start: Callable[..., Harness]) -> None:
        """Spec: OnDelivered is invoked after each successful write with the destination's name."""
        delivered_to: list[str] = []
        h = start(on_delivered=delivered_to.append)
        h.enqueue_new(7)
        assert h.queue.drain() is True
        assert delivered_to == [h.destination.name] * 7

    def test_raising_callbacks_do_not_stop_delivery(self, start: Callable[..., Harness]) -> None:
        """A callback that raises is logged; the entries are still delivered and marked."""

        def boom(*_: object) -> None:
            raise RuntimeError("metrics backend down")

        h = start(on_processed=boom, on_delivered=boom)
        entries = h.enqueue_new(5)
        assert h.queue.drain() is True
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert sorted(h.updater.delivered_ids) == sorted(ids(entries))
        assert "delivery_callback_failed" in h.logger.events("exception")

    def test_raising_on_processed_does_not_skip_on_delivered(self, start: Callable[..., Harness]) -> None:
        """A failing metrics callback does not suppress the cache-invalidation callback."""

        def boom() -> None:
            raise RuntimeError("metrics backend down")

        delivered_to: list[str] = []
        h = start(on_processed=boom, on_delivered=delivered_to.append)
        h.enqueue_new(3)
        assert h.queue.drain() is True
        assert delivered_to == [h.destination.name] * 3


class TestDestinationUnavailable:
    """An unreachable destination pauses delivery and is probed, without using attempts."""

    def test_unavailable_writes_do_not_use_attempts(self, start: Callable[..., Harness]) -> None:
        """DestinationUnavailable, however often, never turns an entry into a dead letter."""
        # Given: more unavailable writes than any entry has attempts
        h = start(workers=1, batch_max=1, max_attempts=2)
        h.destination.refuse_next(6)
        # When
        entries = h.enqueue_new(3)
        wait_until(lambda: len(h.destination.delivered) == 3)
        # Then
        assert sum(c.outcome == "unavailable" for c in h.destination.calls) == 6
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert h.updater.failure_marks == []
        assert "destination_unavailable" in h.logger.events("warning")

    def test_outage_pauses_delivery_and_probes_until_back(self, start: Callable[..., Harness]) -> None:
        """During an outage writes pause and probes repeat; on recovery everything is delivered."""
        # Given: the destination is down
        h = start(max_attempts=2)
        h.destination.go_down()
        entries = h.enqueue_new(3)
        wait_until(lambda: not h.queue.destination_available)
        # When: probes keep failing for a while
        wait_until(lambda: h.destination.probes >= 3)
        assert h.destination.delivered == []
        assert h.updater.failure_marks == []
        # When: it comes back
        h.destination.come_back()
        wait_until(lambda: len(h.destination.delivered) == 3)
        # Then
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert h.updater.failure_marks == []
        assert h.queue.destination_available
        assert "destination_available" in h.logger.events("info")

    def test_enqueue_accepts_until_full_during_outage_then_sheds(self, start: Callable[..., Harness]) -> None:
        """During an outage enqueue still buffers until the queue is full, then sheds load."""
        # Given: the destination is down and the worker holds the first entry
        h = start(size=4, workers=1, batch_max=2, max_attempts=1)
        h.destination.go_down()
        entries = h.enqueue_new(1)
        wait_until(lambda: not h.queue.destination_available)
        # When: the buffer fills
        entries += h.enqueue_new(4)
        with pytest.raises(LoadShed):
            h.queue.enqueue(make_entry())
        # Then: after recovery every accepted entry is delivered, none dead-lettered
        h.destination.come_back()
        wait_until(lambda: len(h.destination.delivered) == 5)
        assert sorted(h.destination.delivered) == sorted(ids(entries))
        assert h.updater.failure_marks == []

    def test_drain_during_outage_returns_promptly_leaving_entries_pending(self, start: Callable[..., Harness]) -> None:
        """A drain during an outage finishes promptly; the entries stay PENDING (unmarked)."""
        h = start(probe_initial=10.0, probe_max=10.0)
        h.destination.go_down()
        h.enqueue_new(3)
        wait_until(lambda: not h.queue.destination_available)
        assert h.queue.drain(timeout=2.0) is True
        assert h.destination.delivered == []
        assert h.updater.delivered_ids == []
        assert h.updater.failure_marks == []


class TestHolds:
    """holds(payload_id) tells whether this queue still owns an entry."""

    def test_holds_while_buffered_or_in_flight_and_not_after_delivery(self, start: Callable[..., Harness]) -> None:
        """holds() is True while an entry is buffered or being written, and False once delivered."""
        # Given: one entry in flight, one buffered
        h = start(workers=1, batch_max=1)
        (in_flight,) = h.stall_writes(1)
        buffered = make_entry()
        h.queue.enqueue(buffered)
        # Then
        assert h.queue.holds(in_flight.payload_id)
        assert h.queue.holds(buffered.payload_id)
        assert not h.queue.holds(make_entry().payload_id)
        # When: both are delivered
        h.destination.release()
        wait_until(lambda: len(h.destination.delivered) == 2)
        # Then
        assert not h.queue.holds(in_flight.payload_id)
        assert not h.queue.holds(buffered.payload_id)


MAX_ATTEMPTS_PROPERTY = 4


class TestDeliveryProperty:
    """Generated schedules of transient failures."""

    @settings(max_examples=25, deadline=None)
    @given(
        fail_counts=st.lists(st.integers(0, MAX_ATTEMPTS_PROPERTY - 1), min_size=1, max_size=8),
        workers=st.integers(1, 3),
        batch_max=st.integers(1, 4),
    )
    def test_entries_failing_fewer_than_max_attempts_are_delivered_exactly_once(
        self, fail_counts: list[int], workers: int, batch_max: int
    ) -> None:
        """Any entry failing fewer than max_attempts times is delivered and marked exactly once, never dead-lettered."""
        h = start_harness(
            workers=workers, batch_max=batch_max, max_attempts=MAX_ATTEMPTS_PROPERTY, initial_backoff=0.001
        )
        try:
            entries = [make_entry() for _ in fail_counts]
            for entry, failures in zip(entries, fail_counts, strict=True):
                h.destination.fail(entry.payload_id, failures)
                h.queue.enqueue(entry)
            wait_until(lambda: set(h.destination.delivered) == set(ids(entries)))
        finally:
            assert h.stop()
        assert Counter(h.destination.delivered) == Counter(ids(entries))
        assert Counter(h.updater.delivered_ids) == Counter(ids(entries))
        assert h.updater.failure_marks == []
