"""File-system steps the durability promises depend on."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make the directory's entries durable: a new, renamed or deleted file survives a crash.

    fsync on a file makes its bytes durable, not its name; that needs the directory's own fsync.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path, mode: int = 0o700) -> bool:
    """Create `path` and any missing parents, each made durable in its parent; True if `path` was made here.

    mkdir alone is not durable: after a power cut the new directory, and every file
    fsynced inside it, can be gone until its parent directory is fsynced too. `path`
    gets `mode` (filtered through the umask), missing parents the umask's default, as
    with mkdir -p. A directory another process made meanwhile is fsynced into its
    parent as well: its maker may not have got that far yet.
    """
    missing: list[Path] = []
    probe = path
    while not probe.is_dir() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    created = False
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode if directory == path else 0o777)
            created = directory == path
        except FileExistsError:
            if not directory.is_dir():
                raise
        fsync_directory(directory.parent)
    return created
