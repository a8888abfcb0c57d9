"""Where a data directory's WAL and dead letters are, and holding its WAL directories for reading.

The layout is nexus_gevent.datadir's, the one the service writes. That module imports
nothing else from the package, so the tool stays light: importing the service would
import the metrics module, whose counters write files under PROMETHEUS_MULTIPROC_DIR
when that is set.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .. import datadir as layout
from ..wal.dirlock import LOCK_NAME, existing_dirs, flock_or_close


class ToolError(Exception):
    """A usage or I/O problem: the command stops with exit code 2 and this message."""


def resolve_data_dir(given: str | None, environ: Mapping[str, str]) -> Path:
    """--data-dir, else $NEXUS_DATA_DIR, else ./var; it must exist."""
    path = Path(given or environ.get(layout.DATA_DIR_ENV) or layout.DEFAULT_DATA_DIR)
    if not path.is_dir():
        raise ToolError(f"data directory not found: {path} (give --data-dir or set {layout.DATA_DIR_ENV})")
    return path


def wal_directories(data_dir: Path) -> list[Path]:
    """The WAL directories (wal/wN) of a data directory, in index order."""
    root = layout.wal_root(data_dir)
    if not root.is_dir():
        raise ToolError(f"no WAL under {data_dir}: {root} does not exist (is --data-dir right?)")
    return existing_dirs(root)


def dead_letters_file(data_dir: Path) -> Path:
    """The dead-letter database of a data directory; it must exist."""
    path = layout.dead_letters_file(data_dir)
    if not path.is_file():
        raise ToolError(f"no dead-letter file under {data_dir}: {path} does not exist")
    return path


@contextmanager
def held_for_reading(directories: Sequence[Path], *, force: bool) -> Iterator[frozenset[Path]]:
    """Hold a shared flock on each WAL directory's LOCK while the caller reads them.

    A live worker holds its directory's lock exclusively, so a directory we cannot
    lock belongs to a running service: raise ToolError, or with `force` yield those
    directories (to be read anyway, as they are being written). While we hold a
    directory, no worker can claim it, so nothing writes it under our feet.

    Never writes: dirlock.try_lock would create the directory and write our pid into
    LOCK; here LOCK is opened read-only (flock does not need write access), and a
    directory without a LOCK file was never claimed by a worker.
    """
    held: list[int] = []
    busy: list[Path] = []
    try:
        for directory in directories:
            fd = _lock_shared(directory / LOCK_NAME)
            if fd is None:
                busy.append(directory)
            elif fd >= 0:
                held.append(fd)
        if busy and not force:
            names = ", ".join(str(d) for d in busy)
            raise ToolError(
                f"WAL directory locked by a running service: {names}; stop the service first "
                "(or give --force to read it anyway, read-only, while it is being written)"
            )
        yield frozenset(busy)
    finally:
        for fd in held:
            os.close(fd)


def _lock_shared(lock_file: Path) -> int | None:
    """A descriptor holding a shared lock; None if a live process holds it; -1 if no LOCK file."""
    try:
        fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    return fd if flock_or_close(fd, fcntl.LOCK_SH) else None
