"""The lazy file system itself: a power cut keeps exactly what was made durable, and nothing else.

Each test writes through the mount from this process (the file system is a process of
its own), closes everything, cuts the power, and reads what the remount shows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from nexus_gevent._files import fsync_directory
from nexus_gevent._shared_map import locked, open_shared_map
from tests.support.lazyfs import LazyMount, require_fuse
from tests.support.proc import wait_for

pytestmark = pytest.mark.fuse


def write_file(path: Path, data: bytes, *, flags: int = 0, sync: str | None = None) -> None:
    """Create or overwrite `path` with `data`; then fsync or fdatasync it if `sync` says so."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        os.write(fd, data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


def durable_file(lazy: LazyMount, name: str, data: bytes) -> Path:
    """A file whose bytes and name are both durable already."""
    path = lazy.mountpoint / name
    write_file(path, data, sync="fsync")
    fsync_directory(lazy.mountpoint)
    return path


def append(path: Path, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | flags)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class TestFileData:
    """Written bytes reach the durable state only through fsync, fdatasync, O_SYNC or O_DSYNC."""

    @pytest.mark.parametrize("call", ["fsync", "fdatasync"])
    def test_synced_bytes_survive_a_cut_and_later_unsynced_bytes_do_not(self, lazy: LazyMount, call: str) -> None:
        """Bytes covered by fsync/fdatasync are there after a cut; bytes written after it are gone."""
        # Given a durable file overwritten and synced, then appended to without a sync
        path = durable_file(lazy, "data", b"old")
        write_file(path, b"synced", sync=call)
        append(path, b"+unsynced")
        assert path.read_bytes() == b"synced+unsynced", "reads see what is not durable yet"
        # When the power is cut
        lazy.power_cut()
        # Then only the synced bytes are there
        assert path.read_bytes() == b"synced"

    @pytest.mark.parametrize("flag", ["O_SYNC", "O_DSYNC"], ids=str)
    def test_a_write_through_a_sync_descriptor_survives_a_cut(self, lazy: LazyMount, flag: str) -> None:
        """A write through an O_SYNC/O_DSYNC descriptor is durable when it returns; a plain one is not."""
        # Given a durable file, one append through a sync descriptor, then one through a plain one
        path = durable_file(lazy, "log", b"head;")
        append(path, b"synced;", getattr(os, flag))
        append(path, b"unsynced;")
        # When the power is cut
        lazy.power_cut()
        # Then the sync descriptor's write is there and the plain one's is not
        assert path.read_bytes() == b"head;synced;"

    def test_an_unsynced_write_is_dropped_whole(self, lazy: LazyMount) -> None:
        """A file whose new bytes were never synced goes back to its last durable content."""
        path = durable_file(lazy, "data", b"durable")
        write_file(path, b"x" * 10_000)
        lazy.power_cut()
        assert path.read_bytes() == b"durable"

    def test_o_trunc_empties_a_file_and_needs_a_sync(self, lazy: LazyMount) -> None:
        """Opening with O_TRUNC empties the file; a cut undoes it unless it was synced."""
        # Given a durable file rewritten shorter through O_TRUNC without a sync
        path = durable_file(lazy, "data", b"0123456789")
        write_file(path, b"x")
        assert path.read_bytes() == b"x", "O_TRUNC did not empty the file"
        # When the power is cut, then the old content is back
        lazy.power_cut()
        assert path.read_bytes() == b"0123456789"
        # And a synced rewrite through O_TRUNC stays short after the next cut
        write_file(path, b"x", sync="fsync")
        lazy.power_cut()
        assert path.read_bytes() == b"x"

    def test_ftruncate_is_a_write_that_needs_a_sync(self, lazy: LazyMount) -> None:
        """A shrink without a sync is undone by a cut; a synced shrink stays."""
        path = durable_file(lazy, "data", b"0123456789")
        os.truncate(path, 4)
        lazy.power_cut()
        assert path.read_bytes() == b"0123456789"
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 4)
            os.fsync(fd)
        finally:
            os.close(fd)
        lazy.power_cut()
        assert path.read_bytes() == b"0123"


class TestNames:
    """Creations, renames, unlinks and mkdirs become durable only with their directory's fsync."""

    def test_a_created_and_fsynced_file_is_lost_without_a_directory_fsync(self, lazy: LazyMount) -> None:
        """fsync of a new file makes its bytes durable, not its name: without the directory's fsync it is gone."""
        write_file(lazy.mountpoint / "new", b"bytes", sync="fsync")
        lazy.power_cut()
        assert not (lazy.mountpoint / "new").exists()

    def test_a_created_file_survives_once_its_directory_is_fsynced(self, lazy: LazyMount) -> None:
        """fsync of the file, then of its directory: both name and bytes survive a cut."""
        write_file(lazy.mountpoint / "new", b"bytes", sync="fsync")
        fsync_directory(lazy.mountpoint)
        lazy.power_cut()
        assert (lazy.mountpoint / "new").read_bytes() == b"bytes"

    def test_a_rename_survives_only_with_a_directory_fsync(self, lazy: LazyMount) -> None:
        """Write-fsync-rename publishes a file durably only once the directory is fsynced."""
        # Given two files made durable under temporary names, each renamed over a durable target
        durable_file(lazy, "a", b"old a")
        durable_file(lazy, "b", b"old b")
        for name in ("a", "b"):
            write_file(lazy.mountpoint / f"{name}.tmp", b"new " + name.encode(), sync="fsync")
            os.rename(lazy.mountpoint / f"{name}.tmp", lazy.mountpoint / name)
            if name == "a":
                fsync_directory(lazy.mountpoint)
        # When the power is cut
        lazy.power_cut()
        # Then the synced rename holds, and the other directory still has its old file
        assert (lazy.mountpoint / "a").read_bytes() == b"new a"
        assert (lazy.mountpoint / "b").read_bytes() == b"old b"
        assert not (lazy.mountpoint / "b.tmp").exists(), "the temporary name was never durable"

    def test_an_unlink_is_undone_without_a_directory_fsync(self, lazy: LazyMount) -> None:
        """A removed file comes back after a cut unless its directory was fsynced after the unlink."""
        kept = durable_file(lazy, "kept", b"k")
        gone = durable_file(lazy, "gone", b"g")
        kept.unlink()
        lazy.power_cut()
        assert kept.read_bytes() == b"k"
        gone.unlink()
        fsync_directory(lazy.mountpoint)
        lazy.power_cut()
        assert not gone.exists()

    def test_a_new_directory_needs_its_parent_fsynced(self, lazy: LazyMount) -> None:
        """A directory made durable inside is still lost when its parent was not fsynced after mkdir."""
        for sync_parent in (False, True):
            directory = lazy.mountpoint / "dir"
            directory.mkdir()
            write_file(directory / "f", b"bytes", sync="fsync")
            fsync_directory(directory)
            if sync_parent:
                fsync_directory(lazy.mountpoint)
            lazy.power_cut()
            if sync_parent:
                assert (directory / "f").read_bytes() == b"bytes"
            else:
                assert not directory.exists()


class TestHolds:
    """A held call ends with the cut, or by itself: a failed test never leaves a process stuck in the kernel."""

    #: How long the test waits for the held fsync to end; the hold limit is one second.
    JOIN_TIMEOUT = 60.0

    def test_a_hold_that_no_cut_ends_cuts_the_power_after_the_hold_limit(self, tmp_path: Path) -> None:
        """A held fsync with neither cut nor resume fails with EIO after --hold-limit, and only synced bytes remain."""
        require_fuse()
        lazy = LazyMount(tmp_path, hold_limit=1.0)
        lazy.start()
        try:
            # Given a durable file appended to, and its next fsync held with no cut to follow
            path = durable_file(lazy, "f", b"durable")
            append(path, b"+unsynced")
            lazy.pause_fsync("f", "before")
            outcome: list[BaseException | None] = []

            def held_fsync() -> None:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.fsync(fd)
                    outcome.append(None)
                except OSError as exc:
                    outcome.append(exc)
                finally:
                    with contextlib.suppress(OSError):
                        os.close(fd)

            thread = threading.Thread(target=held_fsync, daemon=True)
            # When nobody ends the hold
            thread.start()
            thread.join(self.JOIN_TIMEOUT)
            # Then the fsync failed as at a power cut, and the mount keeps only what was synced
            assert not thread.is_alive(), "the held fsync never ended"
            [error] = outcome
            assert isinstance(error, OSError), "the held fsync succeeded"
            assert error.errno == errno.EIO
            assert "dead=1" in lazy.command("stats")
            lazy.remount()
            assert path.read_bytes() == b"durable"
        finally:
            lazy.stop()

    def test_a_torn_write_keeps_all_but_its_last_byte(self, lazy: LazyMount) -> None:
        """A write torn by the cut is durable short of its last byte, so its last record is never whole."""
        # Given a durable file whose next write is torn
        path = durable_file(lazy, "log", b"head;")
        lazy.tear_write("/log")
        outcome: list[BaseException | None] = []

        def torn_append() -> None:
            try:
                append(path, b"0123456789")
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=torn_append, daemon=True)
        thread.start()
        wait_for(lambda: lazy.paused() > 0, self.JOIN_TIMEOUT, "the write to be torn")
        # When the power is cut during it
        lazy.cut()
        thread.join(self.JOIN_TIMEOUT)
        # Then the write failed, and all of it but the last byte is on the disk
        assert not thread.is_alive(), "the torn write never ended"
        [error] = outcome
        assert isinstance(error, OSError), "the torn write succeeded"
        lazy.remount()
        assert path.read_bytes() == b"head;012345678"


class TestWhatTheServiceUses:
    """SQLite in WAL mode and mmap-shared state files work on the mount and keep what they synced."""

    def test_sqlite_wal_full_commits_survive_a_cut(self, lazy: LazyMount) -> None:
        """journal_mode=WAL with synchronous=FULL (its -shm mmap'ed on the mount): every committed row survives."""
        db = lazy.mountpoint / "t.db"
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("CREATE TABLE t (n INTEGER)")
            for n in range(200):
                conn.execute("INSERT INTO t VALUES (?)", (n,))
        lazy.power_cut()
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert [n for (n,) in conn.execute("SELECT n FROM t ORDER BY n")] == list(range(200))

    def test_shared_state_maps_work_on_the_mount(self, lazy: LazyMount) -> None:
        """_shared_map's mmap + flock files (rate-limit buckets, resend hint) read back what was written."""
        path = lazy.mountpoint / "bucket"
        fd, mapped = open_shared_map(path, 64)
        try:
            with locked(fd):
                mapped[:8] = b"ABCDEFGH"
            mapped.flush()
            other_fd, other = open_shared_map(path, 64)
            try:
                assert other[:8] == b"ABCDEFGH"
            finally:
                other.close()
                os.close(other_fd)
        finally:
            mapped.close()
            os.close(fd)
        assert path.read_bytes()[:8] == b"ABCDEFGH"
