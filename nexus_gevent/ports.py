"""The small protocols through which the queue sees the world below and beside it.

The queue knows a destination and a WAL updater only through these, so each can be
swapped (a test double, SQLite, PostgreSQL) without the queue knowing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .entry import Entry


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


class Queryable(Protocol):
    """A destination that can list what it stored, for GET /query/{destination}."""

    def query(
        self, source: str | None = None, subject: str | None = None, limit: int = 50, after: str | None = None
    ) -> tuple[list[dict[str, object]], str | None]:
        """Records oldest first, and the cursor of the next page (None at the end).

        Raises ValueError for a malformed cursor.
        """
        ...
