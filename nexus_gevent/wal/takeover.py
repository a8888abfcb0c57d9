"""Taking over WAL directories no live worker holds: entries whose worker is gone for good.

When gunicorn starts with fewer workers than last time, some WAL directories have no
owner. A worker that can lock such a directory copies its PENDING entries into its
own WAL (durably, keeping their payload_ids) and empties the orphan as soon as that
append has returned, before any of them is delivered: from then on its own WAL holds
them, so they survive a crash like any entry it accepted itself. A crash between the
append and the emptying leaves the entries in both WALs; the destination's idempotent
write on payload_id makes the second delivery harmless.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .._files import fsync_directory
from ..entry import Entry
from .dirlock import existing_dirs, try_lock
from .log import Wal
from .replay import replay_directory
from .segments import list_segments

#: Entries copied per WAL batch, so adopting a large orphan never holds one huge batch.
ADOPT_CHUNK = 1000


def adopt_orphans(root: Path, own: Path, wal: Wal, logger: Any) -> list[Entry]:
    """Move the PENDING entries of every unlocked WAL directory under `root` into `wal`.

    Returns the entries adopted, for the caller to enqueue. Runs on the hub; the
    directory scans and file work go through `wal`'s I/O thread.
    """
    adopted: list[Entry] = []
    for path in existing_dirs(root):
        if path == own or not list_segments(path):
            continue
        lock = try_lock(path)
        if lock is None:
            continue
        try:
            result = wal.run_io(replay_directory, path)
            entries = [entry for entry, _seg in result.pending.values()]
            for start in range(0, len(entries), ADOPT_CHUNK):
                wal.append_many(entries[start : start + ADOPT_CHUNK])
            wal.run_io(_empty_directory, path)
            adopted.extend(entries)
            logger.info("wal_orphan_adopted", orphan=str(path), entries=len(entries), damaged=len(result.damage))
        finally:
            # try_lock wrote this worker's pid into the orphan's LOCK. It only borrowed the
            # directory: leave LOCK naming no one, or /admin/status would report the orphan
            # as held by a live worker.
            with contextlib.suppress(OSError):
                os.ftruncate(lock.fd, 0)
            lock.close()
    return adopted


def _empty_directory(path: Path) -> None:
    for _number, segment in list_segments(path):
        segment.unlink(missing_ok=True)
    fsync_directory(path)
