"""Progress lines on stderr while large WALs are read, at most one every half second."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

#: Seconds between two progress lines.
INTERVAL = 0.5


class Progress:
    """Counts records and segments; `advance` is a wal_walk.Advance."""

    def __init__(
        self,
        stream: TextIO,
        total_segments: int,
        *,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
        interval: float = INTERVAL,
    ) -> None:
        self._stream = stream
        self._total = total_segments
        self._enabled = enabled
        self._clock = clock
        self._interval = interval
        self._started = self._last = clock()
        self.records = 0
        self.segments = 0

    def advance(self, records: int, segments: int) -> None:
        self.records += records
        self.segments += segments
        if self._enabled and self._clock() - self._last >= self._interval:
            self._print()

    def finish(self) -> None:
        """The closing line, so even a fast run shows its totals when progress is on."""
        if self._enabled:
            self._print()

    def _print(self) -> None:
        now = self._last = self._clock()
        elapsed = now - self._started
        rate = self.records / elapsed if elapsed > 0 else 0.0
        self._stream.write(
            f"wal: {self.records} records, {self.segments}/{self._total} segments, {rate:,.0f} records/s\n"
        )
        self._stream.flush()
