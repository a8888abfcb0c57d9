"""The bounded in-memory queue between the WAL and one destination (the spec's package).

The spec's invariants, in Python's idiom:

- ``enqueue`` never blocks or yields. A full queue raises ``LoadShed`` at once; the
  entry is still durable in the WAL and the HTTP layer answers 429.
- ``drain`` is once-guarded: any number of calls, from any number of greenlets, never
  fail and signal the workers once.
- Workers log transient destination errors at WARN and retry with exponential
  backoff. After ``max_attempts`` the entry is marked PERMANENT_FAILURE and dropped.
- A ``None`` logger, destination or updater is refused at construction.

Beyond the spec: an unavailable destination pauses delivery and is probed until
it answers, without using up any entry's attempts; batches are written in one
transaction, and a failing batch is split so one poison entry cannot hold back
healthy neighbours. An entry waiting for its next attempt holds no delivery
greenlet: it waits in a schedule (a heap by due time) served by one retry
greenlet, so poison entries in backoff never slow the healthy ones down.

Attempts count writes: every write an entry takes part in, alone or in a batch, is
one of its attempts, and it waits initial_backoff * 2**(n-1) after its n-th failed
attempt. A failed batch of several entries is written again entry by entry at once
(that is each entry's second attempt), so its healthy entries are delivered without
waiting and the one at fault is found; an entry becomes a dead letter only after a
write of its own failed and its attempts reached max_attempts.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.queue

from .backoff import compute_backoff
from .entry import Entry
from .errors import DestinationUnavailable, LoadShed, PayloadDecodeError, QueueClosed
from .logs import Logger

#: Spec: defaultSize.
DEFAULT_SIZE = 10_000
#: Spec: defaultWorkers. Retries wait in the schedule, not in a worker, so one
#: worker keeps the line moving; the service runs more to overlap round trips.
DEFAULT_WORKERS = 1
#: Spec: maxDeliveryAttempts, giving waits of 1, 2, 4 and 8 s.
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_INITIAL_BACKOFF = 1.0
#: Spec: delivered ids are written back every 100 ms or every 50 ids.
ACK_FLUSH_INTERVAL = 0.1
ACK_FLUSH_COUNT = 50
#: Entries a delivery greenlet takes off the queue for one transaction: large enough to
#: amortise a commit (its fsync) over many entries once a backlog forms, small enough that
#: a batch holds a worker for tens of milliseconds. 1024 rather than 256: at saturation the
#: commits, not the rows, were most of the SQLite write lock's time (bench/batch_path.py).
DEFAULT_BATCH_MAX = 1024
#: Seconds a delivery greenlet waits, once an entry is buffered, for more to arrive before
#: it takes them. 0 (the spec's behaviour) takes them at once; the service passes its
#: NEXUS_DELIVERY_LINGER.
DEFAULT_LINGER = 0.0
#: Entries already waiting that make a worker skip its linger: under a steady heavy load
#: they build up during each write, and waiting longer would only slow delivery down.
LINGER_ENOUGH = 256
#: Probing an unavailable destination: first wait, and the cap of its doubling.
PROBE_INITIAL = 0.2
PROBE_MAX = 5.0


def or_default(value: int, default: int) -> int:
    """The spec's rule for a size or a count: zero or less means the default."""
    return value if value > 0 else default


# The queue knows what lies below it only through these two protocols, so a test
# double, SQLite or PostgreSQL can stand behind it without the queue knowing.


class Destination(Protocol):
    """Where entries are stored for good. Implementations must be idempotent on payload_id."""

    @property
    def name(self) -> str:
        """The destination's configured name."""
        ...

    def write(self, entries: Sequence[Entry]) -> None:
        """Store all of `entries` in one transaction, durably, or none of them.

        Cooperative: may block the calling greenlet, never the hub.
        Raises DestinationUnavailable when the destination cannot be reached and
        any other exception when the batch itself was refused.
        """
        ...

    def probe(self) -> None:
        """Return when the destination answers; raise DestinationUnavailable otherwise."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


class WalUpdater(Protocol):
    """How the queue records what became of an entry."""

    def mark_delivered(self, payload_ids: Sequence[str]) -> None:
        """Record that these entries are durably stored in their destination."""
        ...

    def mark_permanent_failure(self, entry: Entry, error: str, attempts: int) -> None:
        """Record that `entry` is a dead letter; keep its data so it can be listed and retried."""
        ...


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Sizing and retry policy of one queue (spec: Config)."""

    size: int = DEFAULT_SIZE
    workers: int = DEFAULT_WORKERS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    batch_max: int = DEFAULT_BATCH_MAX
    #: Wait this long after the first entry of a batch for more (unless LINGER_ENOUGH
    #: entries or a full batch are already buffered, or a drain began): fewer, larger
    #: destination transactions at a light or steady load.
    linger: float = DEFAULT_LINGER
    probe_initial: float = PROBE_INITIAL
    probe_max: float = PROBE_MAX
    #: Called after each entry is written (feeds bubblefish_queue_processing_rate).
    on_processed: Callable[[], None] | None = None
    #: Called after each entry is written, with the destination's name.
    on_delivered: Callable[[str], None] | None = None


class _Abandon(Exception):
    """A drain arrived while an entry waited; leave it PENDING in the WAL."""


@dataclass(slots=True)
class _Retry:
    """An entry between two attempts: how many it has had, and why the last one failed."""

    entry: Entry
    attempts: int
    error: Exception


class Queue:
    """A bounded queue with delivery greenlets. Call drain() before the process exits."""

    def __init__(self, config: QueueConfig, logger: Logger, destination: Destination, updater: WalUpdater) -> None:
        if logger is None:
            raise TypeError("queue: logger must not be None")
        if destination is None:
            raise TypeError("queue: destination must not be None")
        if updater is None:
            raise TypeError("queue: WAL updater must not be None")
        self._size = or_default(config.size, DEFAULT_SIZE)
        workers = or_default(config.workers, DEFAULT_WORKERS)
        self._cfg = config
        self._log = logger.bind(destination=destination.name)
        self._dest = destination
        self._updater = updater
        self._q: gevent.queue.Queue[Entry] = gevent.queue.Queue(self._size)
        # Ids buffered or being delivered: an entry is never in the queue twice.
        self._known: set[str] = set()
        self._done = gevent.event.Event()
        self._finished = gevent.event.Event()
        self._draining = False
        self._stop_now = False
        self._available = gevent.event.Event()
        self._available.set()
        self._prober: gevent.Greenlet[Any, Any] | None = None
        self._acks: list[str] = []
        self._ack_first = gevent.event.Event()
        self._ack_due = gevent.event.Event()
        self._ack_stop = False
        # Entries waiting for their next attempt: (due, tie-breaker, payload_id).
        self._schedule: list[tuple[float, int, str]] = []
        self._retries: dict[str, _Retry] = {}
        self._order = itertools.count()
        self._schedule_changed = gevent.event.Event()
        self._acker = gevent.spawn(self._ack_loop)
        self._workers = [gevent.spawn(self._work) for _ in range(workers)]
        self._retrier = gevent.spawn(self._retry_loop)

    # -- the spec's surface ----------------------------------------------------

    def enqueue(self, entry: Entry) -> None:
        """Buffer `entry` without blocking or yielding; raise LoadShed when full."""
        if self._draining:
            raise QueueClosed("queue: draining")
        if entry.payload_id in self._known:
            return
        try:
            self._q.put_nowait(entry)
        except gevent.queue.Full:
            raise LoadShed() from None
        self._known.add(entry.payload_id)

    def drain(self, timeout: float | None = None) -> bool:
        """Stop the workers once they have delivered what is buffered, and wait.

        Returns True when every worker finished, False when `timeout` passed first;
        the workers then stop after their current batch, and what is left stays
        PENDING in the WAL for the next owner of this WAL directory.
        """
        if not self._draining:
            # No yield between the test and the set: on the hub this is the once-guard.
            self._draining = True
            self._q.shutdown()
            self._done.set()
            gevent.spawn(self._finish)
        finished = bool(self._finished.wait(timeout))
        if not finished:
            self._stop_now = True
        return finished

    # -- what the service and operators read -----------------------------------

    @property
    def name(self) -> str:
        return self._dest.name

    @property
    def depth(self) -> int:
        return self._q.qsize()

    @property
    def outstanding(self) -> int:
        """Entries buffered or being delivered: what this queue still owes its destination."""
        return len(self._known)

    @property
    def capacity(self) -> int:
        return self._size

    @property
    def free_slots(self) -> int:
        return self._size - self._q.qsize()

    @property
    def destination_available(self) -> bool:
        return self._available.is_set()

    @property
    def draining(self) -> bool:
        return self._draining

    def holds(self, payload_id: str) -> bool:
        """True while the entry is buffered or being delivered by this queue."""
        return payload_id in self._known

    # -- workers ----------------------------------------------------------------

    @property
    def retrying(self) -> int:
        """Entries waiting for their next attempt."""
        return len(self._retries)

    def _finish(self) -> None:
        gevent.joinall([*self._workers, self._retrier])
        self._ack_stop = True
        self._ack_first.set()
        self._ack_due.set()
        self._acker.join()
        self._finished.set()

    def _work(self) -> None:
        while not self._stop_now:
            try:
                # Wait for an entry without taking it, so that a lingering worker holds
                # none: the worker that takes entries takes a run of them in queue order,
                # and the destination stores them in that order.
                self._q.peek()
            except gevent.queue.ShutDown:
                # shutdown() throws into parked getters even when entries were put
                # just before it (the wake-up had not run yet); those are still owed.
                if not self._q.qsize():
                    return
            if self._cfg.linger > 0 and self._q.qsize() < min(self._cfg.batch_max, LINGER_ENOUGH):
                # A drain sets _done: it ends the wait at once, for the drain's deadline.
                self._done.wait(self._cfg.linger)
            batch: list[Entry] = []
            while len(batch) < self._cfg.batch_max:
                try:
                    batch.append(self._q.get_nowait())
                except (gevent.queue.Empty, gevent.queue.ShutDown):
                    break
            if not batch:
                continue  # another worker took them
            try:
                self._deliver(batch)
            except _Abandon:
                pass
            except Exception:
                # A bug must not kill the worker; the entries stay PENDING in the WAL.
                self._log.exception("delivery_crashed", entries=len(batch))
            finally:
                for entry in batch:
                    if entry.payload_id not in self._retries:
                        self._known.discard(entry.payload_id)

    def _deliver(self, batch: list[Entry]) -> None:
        good: list[Entry] = []
        for entry in batch:
            try:
                entry.decode_payload()
            except PayloadDecodeError as exc:
                # Retrying cannot fix a payload: dead-letter it now (spec).
                self._dead_letter(entry, str(exc), 1)
            else:
                good.append(entry)
        if not good:
            return
        try:
            self._write(good)
        except _Abandon:
            raise
        except Exception as exc:
            if len(good) == 1:
                self._failed(good[0], exc, attempts=1)
                return
            # The batch write was each entry's first attempt. Which entry is at fault is
            # not known: write each alone at once, its second attempt, so healthy
            # neighbours go straight through and only the faulty one waits.
            self._warn(good, exc, attempt=1)
            for entry in good:
                self._attempt_alone(entry, attempts=2)
            return
        self._succeeded(good)

    def _attempt_alone(self, entry: Entry, attempts: int) -> None:
        """Write `entry` alone as its attempt number `attempts`; schedule or dead-letter it on failure."""
        try:
            self._write([entry])
        except _Abandon:
            raise
        except Exception as exc:
            self._failed(entry, exc, attempts)
        else:
            self._retries.pop(entry.payload_id, None)
            self._succeeded([entry])

    def _failed(self, entry: Entry, exc: Exception, attempts: int) -> None:
        self._warn([entry], exc, attempt=attempts)
        if attempts >= self._cfg.max_attempts:
            self._retries.pop(entry.payload_id, None)
            self._dead_letter(entry, str(exc), attempts)
            self._known.discard(entry.payload_id)
            return
        if self._done.is_set():
            # Spec: a drain cuts the backoff short; the entry stays PENDING.
            self._log.info("retry_abandoned_by_drain", entries=1)
            self._forget_retry(entry.payload_id)
            return
        self._retries[entry.payload_id] = _Retry(entry, attempts, exc)
        due = time.monotonic() + compute_backoff(self._cfg.initial_backoff, attempts)
        heapq.heappush(self._schedule, (due, next(self._order), entry.payload_id))
        self._schedule_changed.set()

    def _retry_loop(self) -> None:
        """Make each scheduled attempt when it is due; a drain abandons what still waits."""
        while not self._done.is_set():
            if not self._schedule:
                self._schedule_changed.clear()
                gevent.wait([self._schedule_changed, self._done], count=1)
                continue
            due, _, payload_id = self._schedule[0]
            delay = due - time.monotonic()
            if delay > 0:
                self._schedule_changed.clear()
                gevent.wait([self._schedule_changed, self._done], timeout=delay, count=1)
                continue
            heapq.heappop(self._schedule)
            retry = self._retries[payload_id]
            try:
                self._attempt_alone(retry.entry, retry.attempts + 1)
            except _Abandon:
                break
            except Exception:
                # A bug must not kill the schedule; the entry stays PENDING in the WAL.
                self._log.exception("retry_crashed", payload_id=payload_id)
                self._forget_retry(payload_id)
        if self._retries:
            # Spec: a drain cuts the backoff short; the entries stay PENDING.
            self._log.info("retry_abandoned_by_drain", entries=len(self._retries))
        for payload_id in list(self._retries):
            self._forget_retry(payload_id)
        self._schedule.clear()

    def _forget_retry(self, payload_id: str) -> None:
        self._retries.pop(payload_id, None)
        self._known.discard(payload_id)

    def _write(self, entries: Sequence[Entry]) -> None:
        """Write, waiting out destination outages without using up attempts."""
        while True:
            if not self._available.is_set():
                self._await_destination()
            try:
                self._dest.write(entries)
                return
            except DestinationUnavailable as exc:
                self._mark_unavailable(exc)

    def _mark_unavailable(self, exc: Exception) -> None:
        if self._available.is_set():
            self._available.clear()
            self._log.warning("destination_unavailable", error=str(exc))
        if self._prober is None or self._prober.dead:
            self._prober = gevent.spawn(self._probe_until_back)

    def _await_destination(self) -> None:
        gevent.wait([self._available, self._done], count=1)
        if not self._available.is_set():
            raise _Abandon()

    def _probe_until_back(self) -> None:
        failures = 0
        while not self._done.is_set():
            failures += 1
            if self._done.wait(compute_backoff(self._cfg.probe_initial, failures, cap=self._cfg.probe_max)):
                return
            try:
                self._dest.probe()
            except Exception as exc:
                self._log.debug("destination_probe_failed", error=str(exc), probes=failures)
                continue
            self._log.info("destination_available", probes=failures)
            self._available.set()
            return

    def _warn(self, entries: Sequence[Entry], exc: Exception, attempt: int | None = None) -> None:
        self._log.warning(
            "delivery_failed",
            payload_ids=[e.payload_id for e in entries[:10]],
            entries=len(entries),
            attempt=attempt,
            error=str(exc),
            error_type=type(exc).__name__,
        )

    def _succeeded(self, entries: Sequence[Entry]) -> None:
        on_processed, on_delivered = self._cfg.on_processed, self._cfg.on_delivered
        for entry in entries:
            self._acks.append(entry.payload_id)
            # Settled: a neighbour still retrying in this batch must not pin it.
            self._known.discard(entry.payload_id)
            # Separate guards: a failing metric callback must not skip cache invalidation.
            if on_processed is not None:
                try:
                    on_processed()
                except Exception:
                    self._log.exception("delivery_callback_failed", callback="on_processed")
            if on_delivered is not None:
                try:
                    on_delivered(self._dest.name)
                except Exception:
                    self._log.exception("delivery_callback_failed", callback="on_delivered")
        self._ack_first.set()
        if len(self._acks) >= ACK_FLUSH_COUNT:
            self._ack_due.set()

    def _dead_letter(self, entry: Entry, error: str, attempts: int) -> None:
        self._log.error("entry_dead_lettered", payload_id=entry.payload_id, attempts=attempts, error=error)
        try:
            self._updater.mark_permanent_failure(entry, error, attempts)
        except Exception as exc:
            # Unmarked, it stays PENDING and is tried again by the next owner; but if the
            # dead-letter store kept nothing either, an operator must know at once.
            self._log.error("dead_letter_mark_failed", payload_id=entry.payload_id, error=str(exc))

    # -- write-back of delivered ids --------------------------------------------

    def _ack_loop(self) -> None:
        while True:
            self._ack_first.wait()
            self._ack_first.clear()
            if not self._ack_stop and len(self._acks) < ACK_FLUSH_COUNT:
                self._ack_due.wait(ACK_FLUSH_INTERVAL)
            self._ack_due.clear()
            self._flush_acks()
            if self._ack_stop:
                self._flush_acks()
                return

    def _flush_acks(self) -> None:
        if not self._acks:
            return
        ids, self._acks = self._acks, []
        try:
            self._updater.mark_delivered(ids)
        except Exception as exc:
            # Spec: logged and nothing else; the destination write is idempotent,
            # so the worst case is a harmless redelivery after a restart.
            self._log.warning("delivered_writeback_failed", entries=len(ids), error=str(exc))
