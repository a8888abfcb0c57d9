"""Per-source rate limits: a token bucket that every worker of one instance shares.

A source with ``rate_limit_per_second`` (and ``rate_limit_burst``) has a bucket of at
most `burst` tokens, refilled at `rate` tokens a second; a write of n entries takes n
tokens, or is refused with the seconds until they are there (Retry-After).

The workers of one instance are separate processes sharing one data directory, so the
bucket lives there: one small file per source, ``{data_dir}/ratelimit/<source>.bucket``
(mode 0600), holding the tokens and the time of the last refill. Each worker maps it
(mmap, MAP_SHARED: every worker reads and writes the same page of the page cache) and
updates it under ``flock``, so the budget is one for all workers, and a worker that
dies holding the lock releases it with its file descriptor. An update is two system
calls (lock, unlock) and a few float operations, a few microseconds: no thread hand-off.

The refill time is ``time.monotonic()``: on Linux that is CLOCK_MONOTONIC, one clock
for every process of the machine, which never jumps with the wall clock. It restarts
at a reboot; a stamp from the future (an earlier boot) counts as "now", so the bucket
neither refills nor empties because of it. A file that is new, or whose state does not
hold together (a torn write, another version), starts full.

Two instances (two data directories, e.g. behind one nginx) have two buckets: the limit
is per instance.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ._shared_map import locked, open_shared_map
from .secrets import ensure_private_dir

#: Mode of a bucket file: the data directory is its user's alone, and so is this.
#: The state's layout: a magic number (a zeroed or foreign file is not a state),
#: the tokens left and the time.monotonic() of the last refill.
_STATE = struct.Struct("=Qdd")
_MAGIC = 0x6E78_7274_6C69_6D01  # "nxrtlim" and a version byte
#: Retry-After is whole seconds, at least 1 (RFC 9110 section 10.2.3).
MIN_RETRY_AFTER = 1


class TokenBucket:
    """One source's bucket: at most `burst` tokens, `rate` more a second, shared through `path`.

    Every TokenBucket on the same file shares one budget, in this process or another.
    `clock` is there for tests; every user of one file must use the same clock.
    """

    def __init__(self, path: Path, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.path = path
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        # A new file has no magic, so the first take() starts the bucket full.
        self._fd, mapped = open_shared_map(path, _STATE.size)
        self._map: mmap.mmap | None = mapped

    def take(self, n: int = 1) -> int | None:
        """Take `n` tokens: None when they were there, else the whole seconds until they will be (at least 1).

        A refused take takes nothing. `n` may not exceed the burst (such a take could never
        succeed); a caller sending batches must keep them within it.
        """
        if n > self.burst:
            raise ValueError(f"cannot take {n} tokens from a bucket of {self.burst}")
        state = self._map
        if state is None:
            # Closed: this worker has stopped, and its WAL refuses the write anyway.
            return None
        with locked(self._fd):
            now = self._clock()
            tokens = self._refilled(state, now)
            if tokens >= n:
                _STATE.pack_into(state, 0, _MAGIC, tokens - n, now)
                return None
            _STATE.pack_into(state, 0, _MAGIC, tokens, now)
        return max(MIN_RETRY_AFTER, math.ceil((n - tokens) / self.rate))

    def _refilled(self, state: mmap.mmap, now: float) -> float:
        magic: int
        tokens: float
        stamp: float
        magic, tokens, stamp = _STATE.unpack_from(state)
        if magic != _MAGIC or not (math.isfinite(tokens) and math.isfinite(stamp)) or tokens < 0:
            return float(self.burst)
        # A stamp ahead of now is from before a reboot: no time has passed since.
        elapsed = max(0.0, now - stamp)
        # min(): a smaller burst than the last worker's (a changed configuration) caps the tokens.
        return min(float(self.burst), tokens + elapsed * self.rate)

    def close(self) -> None:
        """Unmap and close the file; take() then admits everything (see take)."""
        state, self._map = self._map, None
        if state is not None:
            state.close()
            os.close(self._fd)


def bucket_file(directory: Path, source: str) -> Path:
    """The bucket file of `source` (source names are file-name safe: see config._NAME)."""
    return directory / f"{source}.bucket"


class RateLimits:
    """The buckets of every limited source, by source name (`buckets`); a source without one is unlimited."""

    def __init__(self, buckets: Mapping[str, TokenBucket]) -> None:
        #: A plain dict: the write path looks its source up with .get() on every request.
        self.buckets: dict[str, TokenBucket] = dict(buckets)

    @classmethod
    def open(cls, directory: Path, limits: Iterable[tuple[str, float, int]]) -> RateLimits:
        """Open (creating `directory`, 0700, and the files as needed) a bucket per (source, rate, burst)."""
        wanted = list(limits)
        buckets: dict[str, TokenBucket] = {}
        if wanted:
            ensure_private_dir(directory)
        try:
            for source, rate, burst in wanted:
                buckets[source] = TokenBucket(bucket_file(directory, source), rate, burst)
        except BaseException:
            for bucket in buckets.values():
                bucket.close()
            raise
        return cls(buckets)

    def close(self) -> None:
        for bucket in self.buckets.values():
            bucket.close()
