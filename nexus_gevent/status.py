"""A snapshot of what one worker and its data directory hold, for GET /admin/status."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .wal.dirlock import LOCK_NAME, existing_dirs


@dataclass(frozen=True, slots=True)
class DestinationStatus:
    queue_depth: int
    queue_capacity: int
    backlog: int
    available: bool
    retry_after_seconds: int


@dataclass(frozen=True, slots=True)
class WalDirectoryStatus:
    """A WAL directory, the pid that last held it, and whether that pid lives."""

    directory: str
    pid: int | None
    alive: bool
    this_worker: bool


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    pid: int
    state: str
    wal_directory: str
    destinations: dict[str, DestinationStatus]
    wal_pending: int
    wal_size_bytes: int
    wal_segments: int
    dead_letters: int
    wal_directories: list[WalDirectoryStatus]


def wal_directories(root: Path, own: Path) -> list[WalDirectoryStatus]:
    """Every WAL directory under `root`; `own` is this worker's."""
    rows: list[WalDirectoryStatus] = []
    for path in existing_dirs(root):
        try:
            pid = int((path / LOCK_NAME).read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        rows.append(WalDirectoryStatus(path.name, pid or None, bool(pid) and _pid_alive(pid), path == own))
    return rows


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
