"""The lazy file system's inodes in memory: what readers see now, and what is durable.

A file's written bytes are 4 KiB pages over its backing file until `FileNode.sync`; a
directory's entries are a view in memory until tests/support/lazyfs_server.py syncs
them into the backing directory (`DirNode.durable`). No locking here: the server
holds its one lock around every call.
"""

from __future__ import annotations

import os
import time

#: The unit of the cache; a write of part of a page reads the rest from the durable file first.
PAGE = 4096


def now_ns() -> int:
    return time.time_ns()


class Node:
    """An inode in memory: what readers see now, plus where its durable state lives."""

    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = self.ctime = self.atime = now_ns()
        #: Names in memory that point here.
        self.nlink = 0


class FileNode(Node):
    def __init__(self, ino: int, mode: int, uid: int, gid: int, *, fd: int, durable_size: int) -> None:
        super().__init__(ino, mode, uid, gid)
        #: The backing inode, opened through STORE/<ino>.
        self.fd = fd
        self.size = durable_size
        self.durable_size = durable_size
        #: Bytes of the backing file still valid; past it, a shrink since the last sync made them zeros.
        self.durable_valid = durable_size
        #: Pages written since the last sync: page number -> PAGE bytes (zeros past `size`).
        self.pages: dict[int, bytearray] = {}
        self.opens = 0
        #: Durable names (entries in backing directories) that point here.
        self.durable_links = 0

    def durable_read(self, offset: int, length: int) -> bytes:
        if offset >= self.durable_valid:
            return bytes(length)
        data = os.pread(self.fd, min(length, self.durable_valid - offset), offset)
        return data + bytes(length - len(data))

    def page(self, number: int) -> bytearray:
        page = self.pages.get(number)
        if page is None:
            page = bytearray(self.durable_read(number * PAGE, PAGE))
            self.pages[number] = page
        return page

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            number, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            page = self.pages.get(number)
            out += page[within : within + n] if page is not None else self.durable_read(pos, n)
            pos += n
        return bytes(out)

    def write(self, data: bytes, offset: int) -> None:
        pos, view = offset, memoryview(data)
        while view:
            number, within = divmod(pos, PAGE)
            n = min(PAGE - within, len(view))
            if within == 0 and n == PAGE:
                self.pages[number] = bytearray(view[:n])
            else:
                self.page(number)[within : within + n] = view[:n]
            pos += n
            view = view[n:]
        self.size = max(self.size, offset + len(data))
        self.mtime = now_ns()

    def truncate(self, length: int) -> None:
        if length < self.size:
            for number in [p for p in self.pages if p * PAGE >= length]:
                del self.pages[number]
            number, within = divmod(length, PAGE)
            if within:
                page = self.page(number)
                page[within:] = bytes(PAGE - within)
            self.durable_valid = min(self.durable_valid, length)
        self.size = length
        self.mtime = now_ns()

    def sync(self) -> None:
        """Make what readers see durable: the dirty pages, and the size."""
        if self.durable_valid < self.durable_size:
            os.ftruncate(self.fd, self.durable_valid)
        for number, page in sorted(self.pages.items()):
            start = number * PAGE
            if start < self.size:
                os.pwrite(self.fd, page[: self.size - start], start)
        os.ftruncate(self.fd, self.size)
        self.pages.clear()
        self.durable_size = self.durable_valid = self.size


class DirNode(Node):
    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        super().__init__(ino, mode, uid, gid)
        self.entries: dict[str, Node] = {}
        #: Entries as the backing directory holds them.
        self.durable: dict[str, Node] = {}
        #: Where the backing directory is: (durable parent, name), or None for STORE/d<ino>.
        self.durable_at: tuple[DirNode, str] | None = None
