"""The queue's WAL updater: what became of each entry, recorded in the WAL.

DELIVERED once its destination's commit is durable; PERMANENT_FAILURE once its
attempts are used up, after its data is kept in the dead-letter store.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import metrics
from .deadletters import DeadLetterStore
from .entry import Entry
from .wal import Wal


class Outcomes:
    """Marks entries in the WAL, keeping a dead letter's data in the dead-letter store first."""

    def __init__(self, wal: Wal, dead_letters: DeadLetterStore) -> None:
        self._wal = wal
        self._dead = dead_letters
        #: Dead letters put back to PENDING; they leave the store once delivered.
        #: Read from the store, so retries started before a restart still leave it.
        self.retrying: set[str] = set(dead_letters.retrying_ids())

    def mark_delivered(self, payload_ids: Sequence[str]) -> None:
        self._wal.mark_delivered(payload_ids)
        if self.retrying:
            done = [pid for pid in payload_ids if pid in self.retrying]
            if done:
                # Only after the DELIVERED mark is durable may the dead letter go.
                self._wal.flush()
                self._dead.forget_delivered(done)
                self.retrying.difference_update(done)

    def mark_permanent_failure(self, entry: Entry, error: str, attempts: int) -> None:
        # Dead letter first: once the FAILED mark is in the WAL, the segment holding
        # the entry may be reclaimed, and the dead-letter store is then its only copy.
        self._dead.record(entry, error, attempts)
        self._wal.mark_failed([entry.payload_id])
        metrics.PERMANENT_FAILURES.inc()

    def revive(self, entry: Entry) -> None:
        """Make a dead letter PENDING again; the caller then hands it to its backlog.

        The entry is appended to the WAL again first (durable, PENDING), and only then
        flagged as retrying: a crash in between leaves it both pending and listed,
        and delivering it twice stores it once.
        """
        self._wal.append(entry)
        self._dead.set_retrying(entry.payload_id)
        self.retrying.add(entry.payload_id)
