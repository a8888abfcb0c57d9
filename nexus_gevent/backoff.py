"""Exponential backoff, in one place."""

from __future__ import annotations

#: A retry never waits longer than this, however many attempts came before.
MAX_BACKOFF_SECONDS = 60.0


def compute_backoff(initial: float, failures: int, *, cap: float = MAX_BACKOFF_SECONDS) -> float:
    """Delay before the next attempt after `failures` failures: initial, 2x, 4x, ... capped.

    The spec's schedule: with initial=1 and 5 attempts the waits are 1, 2, 4, 8 s.
    """
    if failures < 1:
        return 0.0
    return float(min(cap, initial * (2 ** (failures - 1))))
