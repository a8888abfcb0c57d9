"""A lane: one destination's queue, plus the backlog of durable entries that did not fit.

The original leaves a shed entry PENDING until the next restart. Here a shed entry
(and one that did not fit at replay) waits in the backlog, and a feeder greenlet
moves it into the queue as soon as there is room. Entries are durable in the WAL
either way; the backlog only decides when they are delivered.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import gevent

from .entry import Entry
from .errors import LoadShed, QueueClosed
from .queue import Queue

#: How often the feeder looks for room while the backlog is not empty.
FEED_INTERVAL = 0.02
#: Durable entries a lane keeps in memory while they wait for room. Past this, they
#: wait on disk only, and are read back from the WAL once the backlog has drained.
BACKLOG_MAX = 100_000
#: Retry-After bounds, in whole seconds (RFC 9110 section 10.2.3 allows any delay).
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 60
#: The delivery rate is measured over this many seconds.
RATE_WINDOW = 5.0


class RateMeter:
    """Deliveries per second over the last RATE_WINDOW seconds, in one-second buckets."""

    def __init__(self) -> None:
        self._buckets: deque[list[float]] = deque()
        # (second, rate): every 429 asks for the rate, and it only changes with a
        # tick or a new second.
        self._cached: tuple[int, float] | None = None

    def tick(self, n: int = 1) -> None:
        self._cached = None
        now = math.floor(time.monotonic())
        if self._buckets and self._buckets[-1][0] == now:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([now, float(n)])
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - RATE_WINDOW:
            self._buckets.popleft()

    def rate(self) -> float:
        now = math.floor(time.monotonic())
        cached = self._cached
        if cached is not None and cached[0] == now:
            return cached[1]
        self._trim(now)
        rate = sum(b[1] for b in self._buckets) / RATE_WINDOW
        self._cached = (now, rate)
        return rate


class Lane:
    """Routes entries to one destination's queue; keeps what does not fit, in order."""

    def __init__(
        self,
        queue: Queue,
        logger: Any,
        meter: RateMeter | None = None,
        *,
        refill: Callable[[int], list[Entry]] | None = None,
        backlog_max: int = BACKLOG_MAX,
    ) -> None:
        self.queue = queue
        #: Fed by the queue's on_processed callback; Retry-After reads it.
        self.meter = meter if meter is not None else RateMeter()
        self._log = logger
        # Oldest first. An OrderedDict, not a dict: the feeder takes from the front, and
        # a dict's `next(iter(d))` skips every slot freed by earlier pops, which made
        # draining a backlog of N entries cost O(N^2) and stall the hub for half a second
        # at a time with 100k entries waiting.
        self._backlog: OrderedDict[str, Entry] = OrderedDict()
        self._backlog_max = backlog_max
        #: Reads PENDING entries of this destination back from the WAL.
        self._refill = refill
        #: Some durable entries were left on disk only, because the backlog was full.
        self._spilled = False
        self._reserved = 0
        self._feeder: gevent.Greenlet[Any, Any] | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.queue.name

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def spilled(self) -> bool:
        """True while some waiting entries are on disk only."""
        return self._spilled

    @property
    def room(self) -> int:
        return self.queue.free_slots - self._reserved

    def holds(self, payload_id: str) -> bool:
        return payload_id in self._backlog or self.queue.holds(payload_id)

    def reserve(self) -> bool:
        """Hold one slot for an entry about to be written (the `reject` policy)."""
        if self._backlog or self.room <= 0:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        self._reserved -= 1

    def offer(self, entry: Entry, *, reserved: bool = False) -> bool:
        """Queue `entry`, or keep it in the backlog; True when it went to the queue."""
        if reserved:
            self._reserved -= 1
        elif self.holds(entry.payload_id):
            return True
        if reserved or (not self._backlog and self.room > 0):
            try:
                self.queue.enqueue(entry)
                return True
            except LoadShed:
                pass
            except QueueClosed:
                # Draining: the entry is durable and stays PENDING for the next owner
                # of this WAL directory; for its client it is accepted all the same.
                return True
        self._keep(entry)
        self._wake_feeder()
        return False

    def _keep(self, entry: Entry) -> None:
        if len(self._backlog) < self._backlog_max or self._refill is None:
            self._backlog[entry.payload_id] = entry
        else:
            self._spilled = True

    def retry_after(self) -> int:
        """Seconds until the backlog should have cleared at the measured delivery rate."""
        waiting = self.queue.outstanding + len(self._backlog)
        rate = max(self.meter.rate(), 1.0)
        return int(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, math.ceil(waiting / rate))))

    def stop(self) -> None:
        """Stop feeding; what is left in the backlog stays PENDING in the WAL."""
        self._stopped = True
        if self._feeder is not None:
            self._feeder.kill()

    def _wake_feeder(self) -> None:
        if not self._stopped and (self._feeder is None or self._feeder.dead):
            self._feeder = gevent.spawn(self._feed)

    def _feed(self) -> None:
        while (self._backlog or self._spilled) and not self._stopped:
            if not self._backlog and self._spilled and self._refill is not None:
                self._spilled = False
                for entry in self._refill(self._backlog_max):
                    if not self.holds(entry.payload_id):
                        self._keep(entry)
                self._log.info("backlog_refilled_from_wal", destination=self.name, entries=len(self._backlog))
                if not self._backlog:
                    return
            moved = 0
            while self._backlog and self.room > 0 and not self.queue.draining:
                payload_id, entry = self._backlog.popitem(last=False)
                try:
                    self.queue.enqueue(entry)
                except LoadShed:
                    # Back at the front, where it was.
                    self._backlog[payload_id] = entry
                    self._backlog.move_to_end(payload_id, last=False)
                    break
                moved += 1
            if self.queue.draining:
                return
            gevent.sleep(FEED_INTERVAL)
