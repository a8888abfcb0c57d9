"""A small state file every worker of an instance maps into memory and updates under one lock.

The rate-limit buckets and the shed resend window's hint are such files: a few bytes
each, read on the request path without a system call, written under `flock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

#: The service's user alone may read or write them.
FILE_MODE = 0o600


def open_shared_map(path: Path, size: int) -> tuple[int, mmap.mmap]:
    """(fd, map) of `path`, created 0600 and zero-filled to `size` bytes if it is new or shorter.

    A zero-filled file carries no magic number, which each user reads as "nothing yet".
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        # O_CREAT's mode is filtered through the umask; set it exactly.
        os.fchmod(fd, FILE_MODE)
        with locked(fd):
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def locked(fd: int) -> Iterator[None]:
    """Hold the file's exclusive lock.

    flock, not lockf: an flock belongs to the open file, so two users of one file exclude
    each other within one process too, and a worker that dies holding it releases it.
    """
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
