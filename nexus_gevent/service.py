"""One worker's service: WAL, destinations, lanes and stores, started and stopped in order.

Startup: claim a WAL directory, open it for appends at once, open the destinations
and their lanes, then replay the older segments in the background (the worker is
not ready until that is done). Shutdown, once: refuse new writes, drain every queue
within one deadline, then close destinations, stores and the WAL, and release the
WAL directory for the next worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gevent
import gevent.event

from . import metrics
from .config import Settings
from .deadletters import DeadLetterStore
from .destinations import open_destination
from .entry import Entry
from .errors import DestinationUnavailable
from .idempotency import IdempotencyIndex
from .ingest import Ingest
from .lane import Lane, RateMeter
from .queue import Destination, Queue, QueueConfig
from .settle import Settlement
from .wal import DirLock, ReplayResult, Wal, claim
from .wal.takeover import adopt_orphans

State = Literal["starting", "replaying", "ready", "draining", "stopped"]

WAL_DIRNAME = "wal"
IDEMPOTENCY_FILENAME = "idempotency.db"
DEAD_LETTERS_FILENAME = "dead-letters.db"
#: Replay logs its progress at most this often.
REPLAY_PROGRESS_INTERVAL = 2.0
#: How often a worker looks for WAL directories no live worker holds.
ADOPT_INTERVAL = 10.0
#: How often live gauges (queue depth, backlog, WAL pending) are published.
GAUGE_INTERVAL = 1.0


def _counting(meter: RateMeter) -> Callable[[], None]:
    processed = metrics.PROCESSED

    def on_processed() -> None:
        processed.inc()
        meter.tick()

    return on_processed


class Service:
    """Everything one gunicorn worker runs besides HTTP."""

    def __init__(self, settings: Settings, logger: Any) -> None:
        self.settings = settings
        self._log = logger
        self.state: State = "starting"
        self.lock: DirLock | None = None
        self.wal: Wal | None = None
        self.destinations: dict[str, Destination] = {}
        self.lanes: dict[str, Lane] = {}
        self.ingest: Ingest | None = None
        self.settlement: Settlement | None = None
        self.dead_letters: DeadLetterStore | None = None
        self.index: IdempotencyIndex | None = None
        self.replay_result: ReplayResult | None = None
        self._replayer: gevent.Greenlet[Any, Any] | None = None
        self._adopter: gevent.Greenlet[Any, Any] | None = None
        self._gauges: gevent.Greenlet[Any, Any] | None = None
        self._shutdown_started = False
        self._stopped = gevent.event.Event()
        self._drained = False

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def start(self) -> None:
        """Open everything; replay runs in the background (see `ready`)."""
        s = self.settings
        self.lock = claim(s.data_dir / WAL_DIRNAME)
        self._log = self._log.bind(wal_dir=self.lock.path.name)
        self.wal = Wal(self.lock.path, segment_bytes=s.wal_segment_bytes, logger=self._log)
        self.wal.start()
        self.dead_letters = DeadLetterStore(s.data_dir / DEAD_LETTERS_FILENAME)
        self.index = IdempotencyIndex(s.data_dir / IDEMPOTENCY_FILENAME, window=s.idempotency_window)
        self.settlement = Settlement(self.wal, self.dead_letters)
        # Retries started before a restart still leave the list once delivered.
        self.settlement.retrying.update(self.dead_letters.retrying_ids())
        for dest in s.destinations:
            destination = open_destination(dest.name, dest.url)
            self.destinations[dest.name] = destination
            meter = RateMeter()
            queue = Queue(
                QueueConfig(
                    size=s.queue_size,
                    workers=s.queue_workers,
                    max_attempts=s.max_attempts,
                    initial_backoff=s.initial_backoff,
                    on_processed=_counting(meter),
                ),
                self._log,
                metrics.MeteredDestination(destination, DestinationUnavailable),
                self.settlement,
            )
            lane = Lane(queue, self._log, meter, refill=self._refiller(dest.name))
            self.lanes[dest.name] = lane
        self.ingest = Ingest(self.wal, self.lanes, self.index, shed_policy=s.shed_policy, logger=self._log)
        self.state = "replaying"
        self._replayer = gevent.spawn(self._replay)
        self._gauges = gevent.spawn(self._update_gauges)
        self._log.info("worker_started", wal_path=str(self.lock.path), destinations=sorted(self.lanes))

    def _refiller(self, destination: str) -> Callable[[int], list[Entry]]:
        def refill(limit: int) -> list[Entry]:
            assert self.wal is not None
            return self.wal.read_pending(destination, limit)

        return refill

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for replay to finish; True when the service is ready."""
        if self._replayer is not None:
            self._replayer.join(timeout)
        return self.state == "ready"

    def _replay(self) -> None:
        assert self.wal is not None
        assert self.index is not None
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
        if self.state == "replaying":
            self.state = "ready"
        self._adopter = gevent.spawn(self._adopt_loop)

    def _take_in(self, entries: list[Entry]) -> tuple[int, int]:
        """Hand entries found on disk to their lanes; returns (queued or backlogged, discarded).

        Their idempotency keys are claimed first: an entry whose worker died between
        its WAL append and its key claim may have lost the key to a client's retry.
        """
        assert self.wal is not None
        assert self.index is not None
        losers = self.index.claim_many(
            (e.source, e.idempotency_key, e.payload_id, e.received_at) for e in entries if e.idempotency_key is not None
        )
        if losers:
            self.wal.mark_discarded(sorted(losers))
        taken = 0
        for entry in entries:
            if entry.payload_id in losers or self.state not in ("replaying", "ready"):
                continue
            lane = self.lanes.get(entry.destination)
            if lane is None:
                self._log.error("unknown_destination", payload_id=entry.payload_id, destination=entry.destination)
                continue
            lane.offer(entry)
            taken += 1
        return taken, len(losers)

    def _adopt_loop(self) -> None:
        """Adopt orphaned WAL directories now and every ADOPT_INTERVAL seconds."""
        assert self.wal is not None
        assert self.lock is not None
        while self.state == "ready":
            # Wait first: workers booting beside this one must claim their own
            # directories before anything counts as an orphan.
            gevent.sleep(ADOPT_INTERVAL)
            if self.state != "ready":
                return
            try:
                adopted = adopt_orphans(self.data_dir / WAL_DIRNAME, self.lock.path, self.wal, self._log)
                if adopted:
                    taken, _discarded = self._take_in(adopted)
                    metrics.REPLAYED.inc(taken)
            except Exception as exc:
                self._log.warning("wal_orphan_adoption_failed", error=str(exc))

    def _update_gauges(self) -> None:
        """Publish this worker's live state every GAUGE_INTERVAL; /metrics sums the workers."""
        while self.state != "stopped":
            for name, lane in self.lanes.items():
                metrics.QUEUE_DEPTH.labels(name).set(lane.queue.depth)
                metrics.BACKLOG.labels(name).set(lane.backlog)
                metrics.DESTINATION_UP.labels(name).set(1 if lane.queue.destination_available else 0)
            if self.wal is not None:
                metrics.WAL_PENDING.set(self.wal.pending_count)
                metrics.WAL_BYTES.set(self.wal.size_bytes)
            metrics.WAL_APPEND_LATENCY_BATCH.publish()
            gevent.sleep(GAUGE_INTERVAL)

    def retry_dead_letter(self, payload_id: str) -> bool:
        """Put a dead letter back to PENDING and deliver it; False if there is no such one.

        The entry is appended to the WAL again first (durable, PENDING), and only then
        flagged as retrying: a crash in between leaves it both pending and listed,
        and delivering it twice stores it once.
        """
        assert self.dead_letters is not None
        assert self.wal is not None
        assert self.settlement is not None
        letter = self.dead_letters.get(payload_id)
        if letter is None:
            return False
        lane = self.lanes.get(letter.entry.destination)
        if lane is None:
            return False
        self.wal.append(letter.entry)
        self.dead_letters.set_retrying(payload_id)
        self.settlement.retrying.add(payload_id)
        lane.offer(letter.entry)
        self._log.info("dead_letter_retried", payload_id=payload_id)
        return True

    def not_ready_reasons(self) -> list[str]:
        """Why /ready should answer 503; empty when ready."""
        reasons: list[str] = []
        if self.state != "ready":
            reasons.append(self.state)
        if self.wal is not None and self.wal.last_error is not None:
            reasons.append("wal_unwritable")
        reasons.extend(
            f"destination_unavailable:{name}"
            for name, lane in self.lanes.items()
            if not lane.queue.destination_available
        )
        return reasons

    def shutdown(self, timeout: float | None = None) -> bool:
        """Drain and close, once. True when every queue drained within `timeout`."""
        if self._shutdown_started:
            self._stopped.wait(timeout)
            return self._drained
        self._shutdown_started = True
        self.state = "draining"
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        if self._replayer is not None and not self._replayer.dead:
            self._replayer.join(timeout=0 if deadline is None else max(0.0, deadline - time.monotonic()))
            self._replayer.kill()
        for helper in (self._adopter, self._gauges):
            if helper is not None:
                helper.kill()
        for lane in self.lanes.values():
            lane.stop()
        drains = [
            gevent.spawn(lane.queue.drain, None if deadline is None else max(0.0, deadline - time.monotonic()))
            for lane in self.lanes.values()
        ]
        gevent.joinall(drains)
        self._drained = all(g.value for g in drains)
        metrics.DRAIN_DURATION.observe(time.monotonic() - started)
        metrics.WAL_APPEND_LATENCY_BATCH.publish()
        left = sum(lane.queue.depth + lane.backlog for lane in self.lanes.values())
        self._log.info(
            "drain_finished", drained=self._drained, seconds=round(time.monotonic() - started, 3), left_pending=left
        )
        self._close()
        self.state = "stopped"
        self._stopped.set()
        return self._drained

    def _close(self) -> None:
        for name, destination in self.destinations.items():
            try:
                destination.close()
            except Exception as exc:
                self._log.warning("destination_close_failed", destination=name, error=str(exc))
        if self.wal is not None:
            self.wal.close()
        for store in (self.index, self.dead_letters):
            if store is not None:
                store.close()
        if self.lock is not None:
            self.lock.close()
