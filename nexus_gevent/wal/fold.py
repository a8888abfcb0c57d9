"""Records -> statuses: the one fold over WAL records, used by replay, the Wal and the offline tool.

The rules, in WAL order (oldest segment first, then file order), the later record winning:

- An entry record makes its entry PENDING, placed at this record: an entry written
  again (a retried dead letter, an adopted orphan) is pending again, ordered by its
  newest record.
- A mark record (DELIVERED, FAILED, DISCARDED) gives each entry it names that status.
  A mark whose entry has no record before it (its segment was reclaimed) ends
  nothing, and an entry record after it is pending.
- A record of any other kind is unknown: ValueError, which readers report as damage.

Replay's fast path (`replay._fold_intact`) writes `Fold.entry` out inline, for speed;
it must stay the same rule as here.
"""

from __future__ import annotations

from collections import Counter
from typing import Generic, TypeVar

from . import records

T = TypeVar("T")

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
DISCARDED = "discarded"
STATUSES = (PENDING, DELIVERED, FAILED, DISCARDED)

#: The status each mark kind gives the entries it names.
MARK_STATUS = {records.DELIVERED: DELIVERED, records.FAILED: FAILED, records.DISCARDED: DISCARDED}


def mark_status(kind: int) -> str:
    """The status a mark record of `kind` gives; ValueError for a kind that is no mark."""
    status = MARK_STATUS.get(kind)
    if status is None:
        raise ValueError(f"unknown record kind {kind}")
    return status


class Fold(Generic[T]):
    """Every entry's status so far, as records are fed to it in WAL order.

    `pending` maps each PENDING entry's id to the caller's value for it (never None:
    replay keeps the entry and its segment, the Wal its segment), in WAL order.
    With `keep_ended`, the status of every entry a mark ended is kept too (the
    offline tool reports them); replay and the Wal need only what is pending.
    """

    __slots__ = ("ended", "pending", "unmatched")

    def __init__(self, *, keep_ended: bool = False) -> None:
        self.pending: dict[str, T] = {}
        #: Entries a mark ended, with the status it gave them; None unless kept.
        self.ended: dict[str, str] | None = {} if keep_ended else None
        #: Ids named by a mark with no entry record before it. Counted only with
        #: `keep_ended`: without it, an id marked twice looks like one never seen.
        self.unmatched = 0

    def entry(self, payload_id: str, value: T) -> bool:
        """An entry record: the entry is PENDING, at this record's place. True if it was pending already."""
        pending = self.pending
        again = pending.pop(payload_id, None) is not None
        if not again and self.ended is not None:
            self.ended.pop(payload_id, None)
        pending[payload_id] = value
        return again

    def end(self, payload_id: str, status: str) -> T | None:
        """A mark naming `payload_id`: its entry gets `status`. Returns its pending value, if it was pending."""
        value = self.pending.pop(payload_id, None)
        ended = self.ended
        if ended is not None:
            if value is not None or payload_id in ended:
                ended[payload_id] = status
            else:
                self.unmatched += 1
        return value

    def mark(self, kind: int, body: bytes) -> int:
        """A mark record: each entry its body names ends with its status. Returns how many ids it names.

        Raises ValueError for a kind that is no mark or a body that is no list of ids.
        """
        status = mark_status(kind)
        payload_ids = records.decode_ids(body)
        for payload_id in payload_ids:
            self.end(payload_id, status)
        return len(payload_ids)

    def status(self, payload_id: str) -> str:
        """The status of an entry fed to this fold (KeyError for one never seen, or ended unkept)."""
        if payload_id in self.pending:
            return PENDING
        if self.ended is None:
            raise KeyError(payload_id)
        return self.ended[payload_id]

    def __len__(self) -> int:
        """How many entries have a status: pending ones, and ended ones when kept."""
        return len(self.pending) + (len(self.ended) if self.ended is not None else 0)

    def counts(self) -> dict[str, int]:
        """How many entries have each status, every status listed."""
        counted = Counter(self.ended.values()) if self.ended is not None else Counter[str]()
        counted[PENDING] = len(self.pending)
        return {status: counted[status] for status in STATUSES}
