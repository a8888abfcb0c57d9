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
