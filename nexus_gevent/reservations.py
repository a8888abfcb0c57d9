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

    def hold(self) -> bool:
        """Promise one free slot; False when none is left."""
        if self.room <= 0:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        """Give a slot back: its entry is being queued, or its write failed."""
        self.held -= 1
