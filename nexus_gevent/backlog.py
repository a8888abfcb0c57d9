"""Entries waiting for queue room: one destination's queue, plus the durable entries that did not fit.

A shed entry (and one that did not fit at replay) is already durable in the WAL. It waits
here, in arrival order, and a feeder greenlet moves it into the queue as soon as there is
room, so it is delivered without a restart. Past `limit` waiting entries the rest wait
on disk only (spill) and are read back from the WAL once the backlog has drained (refill).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import gevent

from . import retry_after
from .entry import Entry
from .errors import LoadShed, QueueClosed
from .logs import Logger
from .queue import Queue
from .reservations import Reservations

#: How often the feeder looks for room while entries wait.
FEED_INTERVAL = 0.02
#: Durable entries kept in memory while they wait for room. Past this, they wait on
#: disk only, and are read back from the WAL once the backlog has drained.
BACKLOG_MAX = 100_000


class Backlog:
    """Routes entries to one destination's queue; keeps what does not fit, in order."""

    def __init__(
        self,
        queue: Queue,
        logger: Logger,
        meter: retry_after.RateMeter | None = None,
        *,
        refill: Callable[[int], list[Entry]] | None = None,
        limit: int = BACKLOG_MAX,
    ) -> None:
        self.queue = queue
        #: Fed by the queue's on_processed callback; Retry-After reads it.
        self.meter = meter if meter is not None else retry_after.RateMeter()
        self.reservations = Reservations(queue)
        self._log = logger
        # Oldest first. An OrderedDict, not a dict: the feeder takes from the front, and
        # a dict's `next(iter(d))` skips every slot freed by earlier pops, which made
        # draining a backlog of N entries cost O(N^2) and stall the hub for half a second
        # at a time with 100k entries waiting.
        self._waiting: OrderedDict[str, Entry] = OrderedDict()
        self._limit = limit
        #: Reads PENDING entries of this destination back from the WAL.
        self._refill = refill
        #: Some durable entries were left on disk only, because the backlog was full.
        self._spilled = False
        self._feeder: gevent.Greenlet[Any, Any] | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.queue.name

    @property
    def waiting(self) -> int:
        """Entries waiting in memory for room in the queue."""
        return len(self._waiting)

    @property
    def room(self) -> int:
        """Free queue slots not promised to a reservation."""
        return self.reservations.room

    def holds(self, payload_id: str) -> bool:
        return payload_id in self._waiting or self.queue.holds(payload_id)

    def reserve(self, n: int = 1) -> bool:
        """Hold `n` queue slots for entries about to be written (the `reject` policy): all or none.

        Entries already waiting go first: while any wait, there is no room to promise.
        """
        return not self._waiting and self.reservations.hold(n)

    def offer(self, entry: Entry, *, reserved: bool = False) -> bool:
        """Queue `entry`, or keep it waiting; True when it went to the queue (or needs no place).

        `reserved`: the entry takes the slot its write reserved.
        """
        if reserved:
            self.reservations.release()
        elif self.holds(entry.payload_id):
            return True
        if reserved or (not self._waiting and self.room > 0):
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
        if len(self._waiting) < self._limit or self._refill is None:
            self._waiting[entry.payload_id] = entry
        else:
            self._spilled = True

    def retry_after(self) -> int:
        """Seconds until what this destination owes should be delivered at the measured rate."""
        return retry_after.estimate(self.queue.outstanding + len(self._waiting), self.meter.rate())

    def stop(self) -> None:
        """Stop feeding; what still waits stays PENDING in the WAL."""
        self._stopped = True
        if self._feeder is not None:
            self._feeder.kill()

    def _wake_feeder(self) -> None:
        if not self._stopped and (self._feeder is None or self._feeder.dead):
            self._feeder = gevent.spawn(self._feed)

    def _feed(self) -> None:
        while (self._waiting or self._spilled) and not self._stopped:
            if not self._waiting and self._spilled and self._refill is not None:
                self._spilled = False
                for entry in self._refill(self._limit):
                    if not self.holds(entry.payload_id):
                        self._keep(entry)
                self._log.info("backlog_refilled_from_wal", destination=self.name, entries=len(self._waiting))
                if not self._waiting:
                    return
            while self._waiting and self.room > 0 and not self.queue.draining:
                payload_id, entry = self._waiting.popitem(last=False)
                try:
                    self.queue.enqueue(entry)
                except LoadShed:
                    # Back at the front, where it was.
                    self._waiting[payload_id] = entry
                    self._waiting.move_to_end(payload_id, last=False)
                    break
            if self.queue.draining:
                return
            gevent.sleep(FEED_INTERVAL)
