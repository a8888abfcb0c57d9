"""The write-ahead log: our own, append-only, framed, group-committed.

Also everything that reads WAL directories (replay, and the one fold of records into
statuses that replay and the offline tool share) or takes them over (orphan adoption).
"""

from .dirlock import DirLock, claim
from .log import DEFAULT_SEGMENT_BYTES, Wal
from .replay import DamageReport, ReplayResult, replay_directory
from .takeover import adopt_orphans

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "DamageReport",
    "DirLock",
    "ReplayResult",
    "Wal",
    "adopt_orphans",
    "claim",
    "replay_directory",
]
