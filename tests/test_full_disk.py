"""The WAL on a full disk: 503 wal_unavailable, nothing acknowledged that is not durable, recovery without restart.

A real gunicorn (one worker, so every request meets the same WAL) keeps its data
directory on a 4 MiB tmpfs, while its SQLite destination lives outside it, so
delivery goes on while the WAL cannot write. A ballast file fills the disk; removing
it must be enough for writes to succeed again.

Mounting needs root (or CAP_SYS_ADMIN): without it these tests are skipped, unless
NEXUS_TEST_REQUIRE_SERVICES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.proc import (
    Gunicorn,
    Launcher,
    Ledger,
    ProcessTestError,
    Response,
    admin_headers,
    destination_locked,
    exactly_once_problems,
    exchange,
    post_headers,
    wait_delivered,
    wait_for,
    wait_table,
)
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.process

#: Small enough to fill in a moment, large enough for the service's files at start.
DISK_SIZE = "4m"
#: Writes tried after the ballast before the WAL must have failed: the last page of
#: the open segment may still take a few dozen small records.
MAX_WRITES_TO_FAIL = 500
#: Refused writes checked one by one once the WAL fails.
REFUSED_WRITES = 10
#: Writes that must succeed once the ballast is gone.
WRITES_AFTER_RECOVERY = 20


@dataclass
class SmallDisk:
    """A size-limited tmpfs holding the data directory, and a destination file outside it."""

    mount_point: Path
    destination: Path

    @property
    def data_dir(self) -> Path:
        return self.mount_point / "data"

    @property
    def ballast(self) -> Path:
        return self.mount_point / "ballast"

    def env(self) -> dict[str, str]:
        return {"NEXUS_DESTINATION_URL": f"sqlite:///{self.destination}"}

    def fill(self) -> int:
        """Write the ballast until the disk is full (ENOSPC), in ever smaller pieces; the bytes written."""
        written = 0
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1 << 12, 1 << 9, 1):
                with contextlib.suppress(OSError):
                    while True:
                        written += os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        self.ballast.unlink()


def _mount(mount_point: Path) -> None:
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE},mode=0700", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        skip_or_fail(f"cannot mount a tmpfs here: {detail.strip()}")


def _unmount(mount_point: Path) -> None:
    """Unmount, waiting for the killed processes' files to close; lazily if it stays busy."""

    def unmounted() -> bool:
        result = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False, timeout=30)
        return result.returncode == 0

    try:
        wait_for(unmounted, 15, f"umount {mount_point}", interval=0.2)
    except ProcessTestError:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False, timeout=30)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs at tmp_path/disk, unmounted at teardown."""
    mount_point = tmp_path / "disk"
    _mount(mount_point)
    try:
        yield SmallDisk(mount_point, tmp_path / "outside.db")
    finally:
        _unmount(mount_point)


@pytest.fixture
def launcher(tmp_path: Path, disk: SmallDisk) -> Iterator[Launcher]:
    """Starts gunicorns; kills them before the disk is unmounted."""
    launch = Launcher(tmp_path)
    yield launch
    launch.cleanup()


class Client:
    """Sequential writes with unique markers, each recorded in a Ledger."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.ledger = Ledger()
        self._next = 0

    def write(self) -> Response:
        n, self._next = self._next, self._next + 1
        self.ledger.record_sent(n)
        response = exchange(self.server.port, "POST", "/inbound/default", json.dumps({"n": n}).encode(), post_headers())
        self.ledger.record_response(n, response.status, response.body)
        return response

    def write_until_refused(self) -> Response:
        """Write until the WAL refuses one; that refusal."""
        for _ in range(MAX_WRITES_TO_FAIL):
            response = self.write()
            if response.status != 202:
                return response
        raise AssertionError(f"{MAX_WRITES_TO_FAIL} writes on a full disk were all accepted")


def assert_wal_unavailable(response: Response) -> None:
    """503 wal_unavailable in the contract's shape, with Retry-After, and no payload_id."""
    assert response.status == 503, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message", "details", "retry_after_seconds"}, body
    assert body["error"] == "wal_unavailable"
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], dict)
    assert "payload_id" not in body["details"]
    assert int(response.headers["retry-after"]) == body["retry_after_seconds"] >= 1


def wal_pending(server: Gunicorn) -> int:
    response = exchange(server.port, "GET", "/admin/status", headers=admin_headers())
    assert response.status == 200, response.body
    pending: int = response.json()["wal"]["pending"]
    return pending


def ready_reasons(server: Gunicorn) -> list[str]:
    response = exchange(server.port, "GET", "/ready")
    if response.status == 200:
        return []
    reasons: list[str] = response.json()["details"]["reasons"]
    return reasons


class TestFullDisk:
    """503 wal_unavailable while the WAL cannot make an entry durable; serving resumes once the cause is gone."""

    def test_a_full_disk_refuses_writes_with_503_and_recovers_without_restart(
        self, launcher: Launcher, disk: SmallDisk
    ) -> None:
        """Disk full: 503 wal_unavailable, /ready wal_unwritable; ballast gone: 202 again, each ack stored once."""
        # Given one worker whose data directory is on a small disk, with entries written
        server = launcher(workers=1, data_dir=disk.data_dir, env=disk.env())
        server.wait_ready()
        client = Client(server)
        for _ in range(5):
            assert client.write().status == 202
        # When the disk is filled
        assert disk.fill() > 0
        # Then writes are refused, in the contract's shape, as long as it stays full
        assert_wal_unavailable(client.write_until_refused())
        for _ in range(REFUSED_WRITES):
            assert_wal_unavailable(client.write())
        # ... /ready says why, while /health still answers
        assert "wal_unwritable" in ready_reasons(server)
        assert exchange(server.port, "GET", "/health").status == 200
        # ... and what was acknowledged before is still delivered meanwhile
        wait_delivered(disk.destination, client.ledger.snapshot_acked(), timeout=30)
        # When the ballast is removed, without a restart
        disk.free()
        # Then writes succeed again and /ready turns 200
        for _ in range(WRITES_AFTER_RECOVERY):
            response = client.write()
            assert response.status == 202, response.body
        wait_for(lambda: ready_reasons(server) == [], 10, "/ready to answer 200 again")
        # ... every acknowledged entry is delivered, and the WAL settles all of them
        # (the DELIVERED marks refused while the disk was full are written later, not lost)
        wait_delivered(disk.destination, client.ledger.snapshot_acked(), timeout=30)
        wait_for(
            lambda: wal_pending(server) == 0,
            10,
            "the WAL to hold nothing pending",
            describe=lambda: f"pending: {wal_pending(server)}",
        )
        code, _ = server.stop(signal.SIGTERM)
        assert code == 0, server.log_tail()
        # ... exactly once, and no refused write was stored
        problems = exactly_once_problems(client.ledger, disk.destination, responses_may_be_lost=False)
        assert problems == [], problems[:20]

    def test_acknowledgements_given_as_the_disk_fills_survive_kill9(self, launcher: Launcher, disk: SmallDisk) -> None:
        """Every 202 given while the disk filled is in the WAL: after kill -9 and a restart, each is stored once."""
        # Given one worker on a small disk whose destination is write-locked, so nothing is delivered
        first = launcher(workers=1, data_dir=disk.data_dir, env=disk.env())
        first.wait_ready()
        wait_table(disk.destination)
        client = Client(first)
        with destination_locked(disk.destination):
            for _ in range(5):
                assert client.write().status == 202
            # When the disk fills up while writes go on, and everything is then killed with SIGKILL
            disk.fill()
            assert_wal_unavailable(client.write_until_refused())
            first.kill9_all()
        acked = client.ledger.snapshot_acked()
        assert len(acked) >= 5
        # Then, with space again, a restart replays the WAL and delivers every acknowledged entry
        disk.free()
        second = launcher(workers=1, data_dir=disk.data_dir, env=disk.env())
        second.wait_ready()
        wait_delivered(disk.destination, acked, timeout=30)
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0, second.log_tail()
        # ... exactly once, and the refused writes never
        problems = exactly_once_problems(client.ledger, disk.destination, responses_may_be_lost=False)
        assert problems == [], problems[:20]


class TestBallast:
    """The test's own tool: the ballast fills the disk."""

    def test_after_the_ballast_one_more_page_fails_with_enospc(self, disk: SmallDisk) -> None:
        """Once filled, writing a new page on the tmpfs fails with ENOSPC, so the tests above meet a full disk."""
        disk.fill()
        fd = os.open(disk.mount_point / "one-more", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as caught:
                os.write(fd, b"x" * 4096)
            assert caught.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
