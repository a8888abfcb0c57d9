"""What the power-cut loop found, each pinned on the lazy file system (tests/support/lazyfs_server.py).

mkdir is not durable until the parent directory is fsynced: a power cut could take the
data directory, the secrets folder or a WAL directory away with everything fsynced
inside it. Each directory the service makes is now fsynced into its parent
(`_files.make_dirs_durable`).
"""

from __future__ import annotations

import contextlib
import sqlite3

import gevent
import pytest

from nexus_gevent._sqlite_thread import SQLiteThread
from nexus_gevent.secrets import ensure_private_dir, load_or_create_secret
from nexus_gevent.testing import RecordingLogger, make_entry
from nexus_gevent.wal import Wal
from nexus_gevent.wal.dirlock import claim
from nexus_gevent.wal.replay import replay_directory
from tests.support.lazyfs import LazyMount

pytestmark = pytest.mark.fuse

#: Bounds a hung WAL close; never reached when things work.
HANG_GUARD_SECONDS = 60


def make_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER)")


class TestDirectoriesTheServiceMakes:
    """A directory the service creates, and what was fsynced inside it, survive a power cut."""

    def test_a_generated_secret_survives_a_power_cut(self, lazy: LazyMount) -> None:
        """A token generated into a new data directory is the same token after a cut."""
        path = lazy.mountpoint / "data" / "secrets" / "admin-token"
        token, created = load_or_create_secret(path)
        assert created
        lazy.power_cut()
        assert load_or_create_secret(path) == (token, False)

    def test_a_private_dir_survives_a_power_cut(self, lazy: LazyMount) -> None:
        """ensure_private_dir's new folders (and their parents) are there after a cut."""
        path = lazy.mountpoint / "data" / "ratelimit"
        assert ensure_private_dir(path)
        lazy.power_cut()
        assert path.is_dir()

    def test_an_entry_in_a_new_wal_directory_survives_a_power_cut(self, lazy: LazyMount) -> None:
        """An appended (acknowledgeable) entry in a freshly claimed WAL directory replays after a cut."""
        lock = claim(lazy.mountpoint / "data" / "wal")
        entry = make_entry()
        wal = Wal(lock.path, logger=RecordingLogger())
        wal.start()
        try:
            wal.append(entry)
        finally:
            with gevent.Timeout(HANG_GUARD_SECONDS):
                wal.close()
            lock.close()
        lazy.power_cut()
        assert list(replay_directory(lock.path).pending) == [entry.payload_id]

    def test_a_row_committed_in_a_new_sqlite_folder_survives_a_power_cut(self, lazy: LazyMount) -> None:
        """A commit through SQLiteThread into a file in a folder it had to create is there after a cut."""
        path = lazy.mountpoint / "data" / "dest" / "x.db"
        db = SQLiteThread(path, make_table)
        try:
            db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
        finally:
            db.close()
        lazy.power_cut()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT n FROM t").fetchall() == [(1,)]
