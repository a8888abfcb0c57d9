"""How long a shed client should wait: the measured delivery rate and the Retry-After estimate.

RFC 9110 section 10.2.3 lets Retry-After carry any delay in seconds. Ours is the time the
entries already waiting for a destination take at the rate it has been delivering lately,
so a client that waits that long finds room.
"""

from __future__ import annotations

import math
import time
from collections import deque

#: Retry-After bounds, in whole seconds: never "now", and never so long a client gives up.
RETRY_AFTER_MIN = 1
RETRY_AFTER_MAX = 60
#: The delivery rate is measured over this many seconds: long enough to smooth one slow
#: batch, short enough to follow an outage's end.
RATE_WINDOW = 5.0
#: A destination that delivered nothing lately is assumed to manage this many a second,
#: so the estimate stays finite.
MIN_RATE = 1.0


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


def estimate(waiting: int, rate: float) -> int:
    """Seconds until `waiting` entries are delivered at `rate` a second, within the bounds."""
    seconds = math.ceil(waiting / max(rate, MIN_RATE))
    return int(min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, seconds)))
