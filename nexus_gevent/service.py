"""One worker's running parts: replay, takeover, gauges and readiness, then the ordered, bounded shutdown.

The parts arrive complete (lifecycle.assemble builds them): the WAL directory is
claimed and the WAL open for appends before anything else, so writes are accepted
while the older segments are replayed in the background; the worker is not ready
until that is done. Shutdown, once: refuse new writes, drain every queue within one
deadline, then close destinations, stores and the WAL, and release the WAL directory
for the next worker.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event

from . import datadir, metrics
from .backlog import Backlog
from .config import Settings
from .deadletters import DeadLetterStore
from .entry import Entry
from .idempotency import IdempotencyIndex
from .ingest import Ingest, key_claims
from .logs import Logger
from .outcomes import Outcomes
from .queue import Destination
from .rate_limit import RateLimits
from .resend_window import ResendWindow
from .status import DestinationStatus, ServiceStatus, wal_directories
from .wal import DirLock, ReplayResult, Wal, adopt_orphans

#: Replay logs its progress at most this often.
REPLAY_PROGRESS_INTERVAL = 2.0
#: How often a worker looks for WAL directories no live worker holds.
ADOPT_INTERVAL = 10.0
#: How often live gauges (queue depth, backlog, WAL pending) are published.
GAUGE_INTERVAL = 1.0
#: How often idempotency keys older than their window are forgotten (and once at start),
#: so the index holds about one window of keys, not every key ever sent.
PRUNE_INTERVAL = 60.0


class WorkerState(enum.Enum):
    """Where a worker is in its life; /ready and /admin/status show the value."""

    STARTING = "starting"
    REPLAYING = "replaying"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


#: The states in which a worker takes writes.
SERVING = frozenset({WorkerState.STARTING, WorkerState.REPLAYING, WorkerState.READY})
#: The states in which entries found on disk are handed to their backlogs.
_TAKING_IN = frozenset({WorkerState.REPLAYING, WorkerState.READY})


@dataclass(frozen=True, slots=True)
class Parts:
    """Everything one worker runs besides HTTP, built complete by lifecycle.assemble."""

    settings: Settings
    lock: DirLock
    wal: Wal
    dead_letters: DeadLetterStore
    index: IdempotencyIndex
    outcomes: Outcomes
    destinations: dict[str, Destination]
    backlogs: dict[str, Backlog]
    ingest: Ingest
    limits: RateLimits
    #: The shed resend window; None when it is off.
    resends: ResendWindow | None = None


class Service:
    """Runs one worker's parts and stops them in order."""

    def __init__(self, parts: Parts, logger: Logger) -> None:
        self.settings = parts.settings
        self.lock = parts.lock
        self.wal = parts.wal
        self.dead_letters = parts.dead_letters
        self.index = parts.index
        self.outcomes = parts.outcomes
        self.destinations = parts.destinations
        self.backlogs = parts.backlogs
        self.ingest = parts.ingest
        self.limits = parts.limits
        self.resends = parts.resends
        self._log = logger
        self.state = WorkerState.STARTING
        self.replay_result: ReplayResult | None = None
        self._helpers: list[gevent.Greenlet[Any, Any]] = []
        self._replayer: gevent.Greenlet[Any, Any] | None = None
        self._shutdown_started = False
        self._stopped = gevent.event.Event()
        self._drained = False

    def start(self) -> None:
        """Replay in the background (see `wait_ready`) and publish gauges."""
        self.state = WorkerState.REPLAYING
        self._replayer = gevent.spawn(self._replay)
        self._helpers.append(gevent.spawn(self._update_gauges))
        self._helpers.append(gevent.spawn(self._prune_loop))
        self._log.info("worker_started", wal_path=str(self.lock.path), destinations=sorted(self.backlogs))

    @property
    def stopping(self) -> bool:
        """True once the worker takes no more writes."""
        return self.state not in SERVING

    def begin_shutdown(self) -> None:
        """Refuse new writes at once; safe inside a signal handler (it never blocks)."""
        if self.state in SERVING:
            self.state = WorkerState.DRAINING

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for replay to finish; True when the service is ready."""
        if self._replayer is not None:
            self._replayer.join(timeout)
        return self.state is WorkerState.READY

    def _replay(self) -> None:
        last = [time.monotonic()]

        def progress(done: int, segs_done: int, segs: int) -> None:
            now = time.monotonic()
            if now - last[0] >= REPLAY_PROGRESS_INTERVAL or segs_done == segs:
                last[0] = now
                self._log.info("wal_replay_progress", records=done, segments_done=segs_done, segments=segs)

        for name, destination in self.destinations.items():
            # Opens the destination and creates its table now rather than at the
            # first delivery; a failure here is only logged, delivery will probe.
            try:
                destination.probe()
            except Exception as exc:
                self._log.warning("destination_unavailable_at_start", destination=name, error=str(exc))
        result = self.wal.replay(progress)
        self.replay_result = result
        requeued, discarded = self._take_in([entry for entry, _seg in result.pending.values()])
        metrics.REPLAYED.inc(requeued)
        metrics.WAL_DAMAGE.inc(len(result.damage))
        rate = result.records / result.seconds if result.seconds > 0 else 0.0
        self._log.info(
            "wal_replayed",
            records=result.records,
            pending=requeued,
            damaged=len(result.damage),
            discarded=discarded,
            seconds=round(result.seconds, 3),
            records_per_second=round(rate),
        )
        if self.state is WorkerState.REPLAYING:
            self.state = WorkerState.READY
        self._helpers.append(gevent.spawn(self._adopt_loop))

    def _take_in(self, entries: list[Entry]) -> tuple[int, int]:
        """Hand entries found on disk to their backlogs; returns (queued or waiting, discarded).

        Their idempotency keys are claimed first: an entry whose worker died between
        its WAL append and its key claim may have lost the key to a client's retry. A
        batch's key is claimed for the whole batch (`key_claims`).
        """
        losers = self.index.claim_many(key_claims(entries))
        if losers:
            self.wal.mark_discarded(sorted(losers))
        taken = 0
        for entry in entries:
            if entry.payload_id in losers or self.state not in _TAKING_IN:
                continue
            backlog = self.backlogs.get(entry.destination)
            if backlog is None:
                self._log.error("unknown_destination", payload_id=entry.payload_id, destination=entry.destination)
                continue
            backlog.offer(entry)
            taken += 1
        return taken, len(losers)

    def _adopt_loop(self) -> None:
        """Adopt orphaned WAL directories now and every ADOPT_INTERVAL seconds."""
        while self.state is WorkerState.READY:
            # Wait first: workers booting beside this one must claim their own
            # directories before anything counts as an orphan.
            gevent.sleep(ADOPT_INTERVAL)
            if self.state is not WorkerState.READY:
                return
            try:
                adopted = adopt_orphans(datadir.wal_root(self.settings.data_dir), self.lock.path, self.wal, self._log)
                if adopted:
                    taken, _discarded = self._take_in(adopted)
                    metrics.REPLAYED.inc(taken)
            except Exception as exc:
                self._log.warning("wal_orphan_adoption_failed", error=str(exc))

    def _update_gauges(self) -> None:
        """Publish this worker's live state every GAUGE_INTERVAL; /metrics sums the workers."""
        while self.state is not WorkerState.STOPPED:
            for name, backlog in self.backlogs.items():
                metrics.QUEUE_DEPTH.labels(name).set(backlog.queue.depth)
                metrics.BACKLOG.labels(name).set(backlog.waiting)
                metrics.DESTINATION_UP.labels(name).set(1 if backlog.queue.destination_available else 0)
            metrics.WAL_PENDING.set(self.wal.pending_count)
            metrics.WAL_BYTES.set(self.wal.size_bytes)
            metrics.WAL_APPEND_LATENCY_BATCH.publish()
            gevent.sleep(GAUGE_INTERVAL)

    def _prune_loop(self) -> None:
        """Forget expired idempotency keys and shed bodies now and every PRUNE_INTERVAL, in their stores' threads."""
        while self.state is not WorkerState.STOPPED:
            try:
                pruned = self.index.prune()
            except Exception as exc:
                self._log.warning("idempotency_prune_failed", error=str(exc))
            else:
                if pruned:
                    self._log.info("idempotency_keys_pruned", keys=pruned)
            if self.resends is not None:
                try:
                    forgotten = self.resends.prune()
                except Exception as exc:
                    self._log.warning("resend_window_prune_failed", error=str(exc))
                else:
                    if forgotten:
                        self._log.info("shed_bodies_pruned", bodies=forgotten)
            gevent.sleep(PRUNE_INTERVAL)

    def retry_dead_letter(self, payload_id: str) -> bool:
        """Put a dead letter back to PENDING and deliver it; False if there is no such one."""
        letter = self.dead_letters.get(payload_id)
        if letter is None:
            return False
        backlog = self.backlogs.get(letter.entry.destination)
        if backlog is None:
            return False
        self.outcomes.revive(letter.entry)
        backlog.offer(letter.entry)
        self._log.info("dead_letter_retried", payload_id=payload_id)
        return True

    def not_ready_reasons(self) -> list[str]:
        """Why /ready should answer 503; empty when ready."""
        reasons: list[str] = []
        if self.state is not WorkerState.READY:
            reasons.append(self.state.value)
        if self.wal.last_error is not None:
            reasons.append("wal_unwritable")
        reasons.extend(
            f"destination_unavailable:{name}"
            for name, backlog in self.backlogs.items()
            if not backlog.queue.destination_available
        )
        return reasons

    def status(self) -> ServiceStatus:
        """What this worker and its data directory hold right now."""
        return ServiceStatus(
            pid=os.getpid(),
            state=self.state.value,
            wal_directory=self.lock.path.name,
            destinations={
                name: DestinationStatus(
                    queue_depth=backlog.queue.depth,
                    queue_capacity=backlog.queue.capacity,
                    backlog=backlog.waiting,
                    available=backlog.queue.destination_available,
                    retry_after_seconds=backlog.retry_after(),
                )
                for name, backlog in self.backlogs.items()
            },
            wal_pending=self.wal.pending_count,
            wal_size_bytes=self.wal.size_bytes,
            wal_segments=self.wal.segment_count,
            dead_letters=self.dead_letters.count(),
            wal_directories=wal_directories(datadir.wal_root(self.settings.data_dir), self.lock.path),
        )

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain and close, once. True when every queue drained within `timeout`."""
        if self._shutdown_started:
            self._stopped.wait(timeout)
            return self._drained
        self._shutdown_started = True
        self.state = WorkerState.DRAINING
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if self._replayer is not None and not self._replayer.dead:
            self._replayer.join(timeout=0 if deadline is None else left())
            self._replayer.kill()
        for helper in self._helpers:
            helper.kill()
        for backlog in self.backlogs.values():
            backlog.stop()
        drains = [gevent.spawn(backlog.queue.drain, left()) for backlog in self.backlogs.values()]
        gevent.joinall(drains)
        self._drained = all(g.value for g in drains)
        metrics.DRAIN_DURATION.observe(time.monotonic() - started)
        metrics.WAL_APPEND_LATENCY_BATCH.publish()
        waiting = sum(backlog.queue.depth + backlog.waiting for backlog in self.backlogs.values())
        self._log.info(
            "drain_finished",
            pid=os.getpid(),
            drained=self._drained,
            seconds=round(time.monotonic() - started, 3),
            left_pending=waiting,
        )
        self._close()
        self.state = WorkerState.STOPPED
        self._stopped.set()
        return self._drained

    def _close(self) -> None:
        for name, destination in self.destinations.items():
            try:
                destination.close()
            except Exception as exc:
                self._log.warning("destination_close_failed", destination=name, error=str(exc))
        self.wal.close()
        self.limits.close()
        self.index.close()
        if self.resends is not None:
            self.resends.close()
        self.dead_letters.close()
        self.lock.close()
