"""Which WAL directory a worker owns: an exclusive, non-blocking flock per directory.

A lock dies with its process, so a directory left by a `kill -9`ed worker is free at
once for the next worker. Locks are taken after fork, never in the master: a lock
taken before fork would be shared by every child.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from .._files import make_dirs_durable

LOCK_NAME = "LOCK"
_PREFIX = "w"


@dataclass
class DirLock:
    """A held WAL directory. Release it with close(); the OS releases it on death."""

    path: Path
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def try_lock(path: Path) -> DirLock | None:
    """Lock `path` if no live process holds it; never blocks."""
    make_dirs_durable(path)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if not flock_or_close(fd, fcntl.LOCK_EX):
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return DirLock(path, fd)


def flock_or_close(fd: int, operation: int) -> bool:
    """flock `fd` with `operation` (LOCK_EX or LOCK_SH) without blocking.

    False, with `fd` closed, when a live process holds a conflicting lock; any other
    failure closes `fd` and raises.
    """
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def existing_dirs(root: Path) -> list[Path]:
    """The WAL directories under `root`, in index order."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def claim(root: Path) -> DirLock:
    """Take the lowest-numbered free WAL directory under `root`, creating one if none is free."""
    make_dirs_durable(root)
    taken = existing_dirs(root)
    for path in taken:
        held = try_lock(path)
        if held is not None:
            return held
    index = int(taken[-1].name[1:]) + 1 if taken else 0
    while True:
        held = try_lock(root / f"{_PREFIX}{index}")
        if held is not None:
            return held
        index += 1
