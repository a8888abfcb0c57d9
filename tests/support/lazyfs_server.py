"""A FUSE file system that forgets what was not made durable, as a power cut would (after Jepsen's LazyFS).

    python -m tests.support.lazyfs_server BACKING MOUNTPOINT --control SOCKET

It passes through to BACKING, a real directory that holds only the *durable* state:
- A file's written bytes stay in this process's memory (4 KiB pages over the backing
  file) until fsync or fdatasync of that file, or they were written through a descriptor
  opened with O_SYNC or O_DSYNC; truncate and ftruncate are writes like any other.
- A creation, unlink, rename, link, mkdir or rmdir changes only the view in memory until
  the directory that holds the name is fsynced. Until then the durable name is the old
  one (or none): a new file that was fsynced but whose directory was not is lost whole.
- Every read sees the newest state, as a page cache would.

Every file's durable bytes live in one backing inode, reachable from STORE/<ino> (a
hard link kept next to BACKING) whether or not any durable name points to it; an
fsync writes there. A directory fsync makes the directory's durable entries equal to
its entries in memory: it links, unlinks and renames in BACKING. A directory not yet
durably named lives at STORE/d<ino>.

The control socket takes one command a connection ("ping", "cut", "hold fsync SUFFIX
before|after", "hold write SUFFIX torn", "paused", "resume", "stats"). A hold stops the
next fsync (before or after it is made durable) or write (with all but its last byte on the
disk) of a file whose name ends with SUFFIX, until the cut (or, after --hold-limit seconds
with neither cut nor resume, it cuts the power itself). "cut" is the power cut: everything not
durable is forgotten at once and every later operation fails with EIO; the caller
unmounts, which ends this process, and starts a new one on BACKING, which holds what a
real power cut would have left. See tests/support/lazyfs.py for the client, and
tests/support/lazyfs_nodes.py for the inodes in memory.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mfusepy

from tests.support.lazyfs_nodes import PAGE, DirNode, FileNode, Node, now_ns

#: Flags of an open that makes each write durable before it returns (O_SYNC contains O_DSYNC on Linux).
SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
#: A hold that no cut or resume ends (its test failed first) cuts the power itself after this
#: long: a process inside the held call cannot even be killed until the file system answers.
HOLD_LIMIT_SECONDS = 300.0

T = TypeVar("T")


@dataclass
class Handle:
    """An open file or directory: its node, whether each write is synced, the path it was opened by."""

    node: Node
    sync: bool
    path: str


class PowerCut(OSError):
    """What every call gets after the cut: EIO, as from a disk that is gone."""

    def __init__(self) -> None:
        super().__init__(errno.EIO, "the power was cut")


class LazyFS(mfusepy.Operations):  # type: ignore[misc]
    """The file system's operations; one lock serialises them (a test tool, not a fast one)."""

    use_ns = True
    # nullpath_ok: calls on an open file come with its handle and no path (an unlinked
    # open file has none, under hard_remove), so they never depend on the name.
    flag_nopath = True
    flag_nullpath_ok = True

    def __init__(self, backing: Path, store: Path, *, hold_limit: float = HOLD_LIMIT_SECONDS) -> None:
        self.backing = backing
        self.store = store
        self.hold_limit = hold_limit
        self._mutex = threading.RLock()
        self.dead = False
        self._inos = iter(range(2, 1 << 62))
        self._handles: dict[int, Handle] = {}
        self._fhs = iter(range(1, 1 << 62))
        self.fsyncs = 0
        self.dir_fsyncs = 0
        # Holding one operation (the ordering and torn-write tests): (operation, the end of
        # the name its file was opened by, when), and how many were held.
        self.hold: tuple[str, str, str] | None = None
        self.paused = 0
        self.release_paused = threading.Event()
        self.root = self._load()

    # -- loading the durable state (a mount after a power cut) ------------------

    def _load(self) -> DirNode:
        shutil.rmtree(self.store, ignore_errors=True)
        self.store.mkdir(parents=True)
        st = os.stat(self.backing)
        root = DirNode(1, st.st_mode, st.st_uid, st.st_gid)
        root.nlink = 1
        by_inode: dict[tuple[int, int], FileNode] = {}
        self._scan(root, self.backing, by_inode)
        return root

    def _scan(self, directory: DirNode, path: Path, by_inode: dict[tuple[int, int], FileNode]) -> None:
        for entry in os.scandir(path):
            st = entry.stat(follow_symlinks=False)
            node: Node
            if stat.S_ISDIR(st.st_mode):
                node = DirNode(next(self._inos), st.st_mode, st.st_uid, st.st_gid)
                node.durable_at = (directory, entry.name)
                self._scan(node, Path(entry.path), by_inode)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                existing = by_inode.get(key)
                if existing is None:
                    ino = next(self._inos)
                    os.link(entry.path, self.store / str(ino))
                    fd = os.open(self.store / str(ino), os.O_RDWR | os.O_CLOEXEC)
                    existing = FileNode(ino, st.st_mode, st.st_uid, st.st_gid, fd=fd, durable_size=st.st_size)
                    by_inode[key] = existing
                node = existing
                existing.durable_links += 1
            else:
                continue  # sockets, symlinks: nothing the service keeps durable
            node.mtime = st.st_mtime_ns
            node.nlink += 1
            directory.entries[entry.name] = node
            directory.durable[entry.name] = node

    # -- helpers ---------------------------------------------------------------

    def _backing_dir(self, directory: DirNode) -> Path:
        if directory is self.root:
            return self.backing
        if directory.durable_at is None:
            return self.store / f"d{directory.ino}"
        parent, name = directory.durable_at
        return self._backing_dir(parent) / name

    def _split(self, path: str) -> tuple[DirNode, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        directory = self._resolve(parent or "/")
        if not isinstance(directory, DirNode):
            raise OSError(errno.ENOTDIR, path)
        return directory, name

    def _resolve(self, path: str) -> Node:
        node: Node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not isinstance(node, DirNode):
                raise OSError(errno.ENOTDIR, path)
            found = node.entries.get(part)
            if found is None:
                raise OSError(errno.ENOENT, path)
            node = found
        return node

    def _node(self, path: str | None, fh: int | None) -> Node:
        if fh:
            handle = self._handles.get(fh)
            if handle is not None:
                return handle.node
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        return self._resolve(path)

    def _file(self, path: str | None, fh: int | None) -> FileNode:
        node = self._node(path, fh)
        if not isinstance(node, FileNode):
            raise OSError(errno.EISDIR, str(path))
        return node

    def _forget_if_unused(self, node: Node) -> None:
        if isinstance(node, FileNode) and node.nlink == 0 and node.opens == 0 and node.durable_links == 0:
            os.close(node.fd)
            os.unlink(self.store / str(node.ino))

    def _live(self, op: Callable[[], T]) -> T:
        with self._mutex:
            if self.dead:
                raise PowerCut
            return op()

    def _new_file(self, path: str, mode: int) -> tuple[FileNode, int]:
        directory, name = self._split(path)
        if name in directory.entries:
            raise OSError(errno.EEXIST, path)
        ino = next(self._inos)
        fd = os.open(self.store / str(ino), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        uid, gid, _ = mfusepy.fuse_get_context()
        node = FileNode(ino, stat.S_IFREG | stat.S_IMODE(mode), uid, gid, fd=fd, durable_size=0)
        node.nlink = 1
        directory.entries[name] = node
        directory.mtime = now_ns()
        return node, self._open_handle(node, 0, path)

    def _open_handle(self, node: Node, flags: int, path: str) -> int:
        fh = next(self._fhs)
        self._handles[fh] = Handle(node, bool(flags & SYNC_FLAGS), path)
        if isinstance(node, FileNode):
            node.opens += 1
        return fh

    # -- attributes --------------------------------------------------------------

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        def op() -> dict[str, Any]:
            node = self._node(path, fh)
            size = node.size if isinstance(node, FileNode) else PAGE
            nlink = node.nlink
            if isinstance(node, DirNode):
                nlink += 1 + sum(isinstance(child, DirNode) for child in node.entries.values())
            return {
                "st_mode": node.mode,
                "st_nlink": max(nlink, 1),
                "st_size": size,
                "st_blocks": (size + 511) // 512,
                "st_uid": node.uid,
                "st_gid": node.gid,
                "st_atime": node.atime,
                "st_mtime": node.mtime,
                "st_ctime": node.ctime,
            }

        return self._live(op)

    def chmod(self, path: str | None, mode: int) -> int:
        def op() -> int:
            node = self._resolve(path or "/")
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
            node.ctime = now_ns()
            return 0

        return self._live(op)

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        def op() -> int:
            node = self._resolve(path or "/")
            node.uid = node.uid if uid == -1 else uid
            node.gid = node.gid if gid == -1 else gid
            return 0

        return self._live(op)

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        def op() -> int:
            node = self._resolve(path or "/")
            node.atime, node.mtime = times if times is not None else (now_ns(), now_ns())
            return 0

        return self._live(op)

    def access(self, path: str, amode: int) -> int:
        return self._live(lambda: (self._resolve(path), 0)[1])

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.backing)
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    # -- the namespace (in memory until the directory is fsynced) ----------------------------

    def readdir(self, path: str, fh: int) -> list[str]:
        def op() -> list[str]:
            node = self._node(path, fh)
            if not isinstance(node, DirNode):
                raise OSError(errno.ENOTDIR, path)
            return [".", "..", *node.entries]

        return self._live(op)

    def opendir(self, path: str) -> int:
        return self._live(lambda: self._open_handle(self._resolve(path), 0, path))

    def releasedir(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self._handles.pop(fh, None)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        def op() -> int:
            directory, name = self._split(path)
            if name in directory.entries:
                raise OSError(errno.EEXIST, path)
            uid, gid, _ = mfusepy.fuse_get_context()
            node = DirNode(next(self._inos), stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
            node.nlink = 1
            os.mkdir(self.store / f"d{node.ino}", 0o700)
            directory.entries[name] = node
            directory.mtime = now_ns()
            return 0

        return self._live(op)

    def rmdir(self, path: str) -> int:
        def op() -> int:
            directory, name = self._split(path)
            node = directory.entries.get(name)
            if node is None:
                raise OSError(errno.ENOENT, path)
            if not isinstance(node, DirNode):
                raise OSError(errno.ENOTDIR, path)
            if node.entries:
                raise OSError(errno.ENOTEMPTY, path)
            del directory.entries[name]
            node.nlink = 0
            return 0

        return self._live(op)

    def unlink(self, path: str) -> int:
        def op() -> int:
            directory, name = self._split(path)
            node = directory.entries.get(name)
            if node is None:
                raise OSError(errno.ENOENT, path)
            if isinstance(node, DirNode):
                raise OSError(errno.EISDIR, path)
            del directory.entries[name]
            node.nlink -= 1
            directory.mtime = now_ns()
            self._forget_if_unused(node)
            return 0

        return self._live(op)

    def link(self, target: str, source: str) -> int:
        def op() -> int:
            node = self._resolve(source)
            if isinstance(node, DirNode):
                raise OSError(errno.EPERM, source)
            directory, name = self._split(target)
            if name in directory.entries:
                raise OSError(errno.EEXIST, target)
            directory.entries[name] = node
            node.nlink += 1
            return 0

        return self._live(op)

    def rename(self, old: str, new: str) -> int:
        def op() -> int:
            src_dir, src_name = self._split(old)
            node = src_dir.entries.get(src_name)
            if node is None:
                raise OSError(errno.ENOENT, old)
            dst_dir, dst_name = self._split(new)
            replaced = dst_dir.entries.get(dst_name)
            if replaced is node:
                return 0
            if replaced is not None:
                if isinstance(replaced, DirNode) != isinstance(node, DirNode):
                    raise OSError(errno.EISDIR if isinstance(replaced, DirNode) else errno.ENOTDIR, new)
                if isinstance(replaced, DirNode) and replaced.entries:
                    raise OSError(errno.ENOTEMPTY, new)
                replaced.nlink -= 1
            del src_dir.entries[src_name]
            dst_dir.entries[dst_name] = node
            src_dir.mtime = dst_dir.mtime = now_ns()
            if replaced is not None:
                self._forget_if_unused(replaced)
            return 0

        return self._live(op)

    def symlink(self, target: str, source: str) -> int:
        raise OSError(errno.EPERM, "symlinks are not modelled")

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        def op() -> int:
            directory = self._node(path, fh)
            if not isinstance(directory, DirNode):
                raise OSError(errno.ENOTDIR, str(path))
            self._sync_dir(directory)
            self.dir_fsyncs += 1
            return 0

        return self._live(op)

    def _sync_dir(self, directory: DirNode) -> None:
        """Make the directory's durable entries those it has in memory."""
        here = self._backing_dir(directory)
        for name, node in list(directory.durable.items()):
            if directory.entries.get(name) is node:
                continue
            del directory.durable[name]
            if isinstance(node, FileNode):
                os.unlink(here / name)
                node.durable_links -= 1
                self._forget_if_unused(node)
            elif isinstance(node, DirNode):
                os.rename(here / name, self.store / f"d{node.ino}")
                node.durable_at = None
        for name, node in directory.entries.items():
            if directory.durable.get(name) is node:
                continue
            if isinstance(node, FileNode):
                os.link(self.store / str(node.ino), here / name)
                node.durable_links += 1
            elif isinstance(node, DirNode):
                # A directory has one durable name: moving it here takes it from where it was.
                os.rename(self._backing_dir(node), here / name)
                if node.durable_at is not None:
                    old_parent, old_name = node.durable_at
                    del old_parent.durable[old_name]
                node.durable_at = (directory, name)
            directory.durable[name] = node
        for node in directory.durable.values():
            # The backing inode holds the durable mode, so a synced name shows the mode it had.
            if isinstance(node, FileNode):
                os.fchmod(node.fd, stat.S_IMODE(node.mode))

    # -- file data (in memory until fsync) ---------------------------------------------------

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        def op() -> int:
            _, fh = self._new_file(path, mode)
            self._handles[fh].sync = bool(flags & SYNC_FLAGS)
            return fh

        return self._live(op)

    def mknod(self, path: str, mode: int, dev: int) -> int:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "only regular files are modelled")

        def op() -> int:
            node, fh = self._new_file(path, mode)
            self._handles.pop(fh)
            node.opens -= 1
            return 0

        return self._live(op)

    def open(self, path: str, flags: int) -> int:
        def op() -> int:
            node = self._resolve(path)
            if not isinstance(node, FileNode):
                raise OSError(errno.EISDIR, path)
            fh = self._open_handle(node, flags, path)
            if flags & os.O_TRUNC:
                # libfuse3 turns on atomic_o_trunc: the kernel sends O_TRUNC with the open
                # and no truncate of its own, so the file system must empty the file here.
                node.truncate(0)
                if self._handles[fh].sync:
                    node.sync()
            return fh

        return self._live(op)

    def release(self, path: str | None, fh: int) -> int:
        with self._mutex:
            handle = self._handles.pop(fh, None)
            if handle is not None and isinstance(handle.node, FileNode):
                handle.node.opens -= 1
                if not self.dead:
                    self._forget_if_unused(handle.node)
        return 0

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self._live(lambda: self._file(path, fh).read(offset, size))

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        if self._held(fh, "write", "torn"):
            self._tear(fh, data, offset)

        def op() -> int:
            node = self._file(path, fh)
            node.write(data, offset)
            if self._handles[fh].sync:
                node.sync()
            return len(data)

        return self._live(op)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        def op() -> int:
            node = self._file(path, fh)
            node.truncate(length)
            handle = self._handles.get(fh) if fh else None
            if handle is not None and handle.sync:
                node.sync()
            return 0

        return self._live(op)

    def fallocate(self, path: str | None, mode: int, offset: int, length: int, fh: int) -> int:
        def op() -> int:
            node = self._file(path, fh)
            if mode == 0 and offset + length > node.size:
                node.truncate(offset + length)
            elif mode not in (0, 1):  # 1: FALLOC_FL_KEEP_SIZE, which changes nothing a reader sees
                raise OSError(errno.EOPNOTSUPP, "fallocate mode")
            return 0

        return self._live(op)

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        if self._held(fh, "fsync", "before"):
            self._wait_held()

        def op() -> int:
            self._file(path, fh).sync()
            self.fsyncs += 1
            return 0

        result = self._live(op)
        if self._held(fh, "fsync", "after"):
            self._wait_held()
        return result

    # -- the power cut, and holding one fsync ------------------------------------------------

    def cut(self) -> None:
        """Forget everything not durable; every later operation fails with EIO."""
        with self._mutex:
            self.dead = True
            self.hold = None
        self.release_paused.set()

    def _held(self, fh: int, operation: str, when: str) -> bool:
        """True, once, for the operation the `hold` command names; the caller then holds it."""
        with self._mutex:
            handle = self._handles.get(fh)
            if handle is None or self.hold is None or self.hold[0] != operation or self.hold[2] != when:
                return False
            # The name it was opened by: libfuse passes no path to fsync or write (nullpath_ok).
            if not handle.path.endswith(self.hold[1]):
                return False
            self.hold = None
            self.paused += 1
            return True

    def _tear(self, fh: int, data: bytes, offset: int) -> None:
        """The power fails mid-write: all of it but its last byte reaches the disk, and the write never returns.

        Not half: a batch of two records of one size splits at their boundary, and then
        nothing is torn. Short of the last byte, the last record always is.
        """
        with self._mutex:
            node = self._file(None, fh)
            node.write(data[: max(1, len(data) - 1)], offset)
            node.sync()
        self._wait_held()
        raise PowerCut

    def _wait_held(self) -> None:
        """Hold the calling operation until the cut or a resume, or cut the power after `hold_limit`."""
        if not self.release_paused.wait(self.hold_limit):
            logging.getLogger(__name__).error("a hold lasted %.0f s with no cut or resume: cutting", self.hold_limit)
            self.cut()

    def command(self, line: str) -> str:
        """Run one control command; "ok ..." or "error ..."."""
        words = line.split()
        name, args = (words[0], words[1:]) if words else ("", [])
        holds = {"fsync": ("before", "after"), "write": ("torn",)}
        if name == "hold" and len(args) == 3 and args[2] in holds.get(args[0], ()):
            with self._mutex:
                self.release_paused.clear()
                self.hold, self.paused = (args[0], args[1], args[2]), 0
            return "ok"
        simple: dict[str, Callable[[], str]] = {
            "ping": lambda: "",
            "cut": _quiet(self.cut),
            "paused": lambda: str(self.paused),
            "resume": _quiet(self.resume),
            "stats": lambda: f"fsyncs={self.fsyncs} dir_fsyncs={self.dir_fsyncs} dead={int(self.dead)}",
        }
        if name not in simple or args:
            return f"error unknown command {line!r}"
        return f"ok {simple[name]()}".rstrip()

    def resume(self) -> None:
        with self._mutex:
            self.hold = None
        self.release_paused.set()


def _quiet(action: Callable[[], None]) -> Callable[[], str]:
    """`action` as a command whose answer is a bare "ok"."""

    def run() -> str:
        action()
        return ""

    return run


def serve_control(fs: LazyFS, path: Path) -> None:
    """Answer one command per connection on the Unix socket at `path`, in a daemon thread."""
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def loop() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall((fs.command(data.decode().strip()) + "\n").encode())

    threading.Thread(target=loop, name="lazyfs-control", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--store", type=Path, default=None, help="default: BACKING.store beside BACKING")
    parser.add_argument(
        "--hold-limit", type=float, default=HOLD_LIMIT_SECONDS, help="seconds before a held call cuts the power"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    backing = args.backing.resolve()
    store = args.store.resolve() if args.store else backing.with_name(backing.name + ".store")
    fs = LazyFS(backing, store, hold_limit=args.hold_limit)
    serve_control(fs, args.control)
    # hard_remove: an unlinked open file is really unlinked here, not renamed to .fuse_hidden*,
    # which would be a namespace change of libfuse's own. direct_io stays off, so mmap works.
    _FUSE(fs, str(args.mountpoint), foreground=True, hard_remove=True, fsname="lazyfs")
    return 0


class _FUSE(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy, but ftruncate keeps its handle (mfusepy drops it), so O_SYNC ftruncates sync."""

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return int(self.ftruncate(path, length, fip))


if __name__ == "__main__":
    raise SystemExit(main())
