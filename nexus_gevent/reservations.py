"""Queue slots held for `reject`-policy writes while their WAL append is under way.

Under `reject` a 429 must mean that nothing was stored, so whether there is room is
decided before the append, not after it: the slot is held first, and the entry takes
it once durable (or gives it back if the append failed or found a duplicate).
"""

from __future__ import annotations

from .queue import Queue


class Reservations:
    """Slots of one queue promised to entries not in it yet."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self.held = 0

    @property
    def room(self) -> int:
        """Free slots not promised yet."""
        return self._queue.free_slots - self.held

    def hold(self, n: int = 1) -> bool:
        """Promise `n` free slots (a batch's entries: all of them or none); False when fewer are left."""
        if self.room < n:
            return False
        self.held += n
        return True

    def release(self, n: int = 1) -> None:
        """Give `n` slots back: their entries are being queued, or their write failed."""
        self.held -= n
