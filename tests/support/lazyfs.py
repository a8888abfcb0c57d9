"""The test side of tests/support/lazyfs_server.py: mount it, cut its power, mount what remains.

`LazyMount.start()` mounts the file system as a process of its own; `power_cut()` tells it
to forget everything not durable, unmounts, and mounts again on what the backing
directory holds, which is what a real power cut would have left. Every process using
the mount must be dead before the cut (a real power cut kills them too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.proc import ROOT, wait_for
from tests.support.services import kill_session, skip_or_fail, start_in_session

#: Mounting takes a Python start and a scan of the backing directory; generous for a loaded CI box.
MOUNT_TIMEOUT = 60.0
#: A command on the control socket is answered at once unless the machine is stalled.
CONTROL_TIMEOUT = 30.0
#: Every process using the mount is dead before an unmount; this only covers the kernel letting go.
UNMOUNT_TIMEOUT = 10.0


def require_fuse() -> None:
    """Skip (or fail, when services are required) where FUSE cannot be mounted."""
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        skip_or_fail("fusermount3 is missing (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        skip_or_fail(f"mfusepy cannot load libfuse3: {exc}")


class LazyMount:
    """One lazy file system: `backing` holds the durable state, `mountpoint` is what programs use."""

    def __init__(self, base: Path, *, hold_limit: float | None = None) -> None:
        self.base = base
        #: Seconds a held call waits for the cut before the file system cuts itself (None: its default).
        self.hold_limit = hold_limit
        self.backing = base / "durable"
        self.mountpoint = base / "mnt"
        self.control = base / "control.sock"
        self.log_path = base / "lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def start(self) -> None:
        """Mount on whatever `backing` holds; returns once the mount answers."""
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)
        command = [sys.executable, "-m", "tests.support.lazyfs_server", str(self.backing), str(self.mountpoint)]
        command += ["--control", str(self.control)]
        if self.hold_limit is not None:
            command += ["--hold-limit", str(self.hold_limit)]
        self.proc = start_in_session(command, cwd=ROOT, log_path=self.log_path)

        def mounted() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"lazyfs exited with {self.proc.returncode}\n{self.log_tail()}")
            return os.path.ismount(self.mountpoint) and self.control.exists()

        try:
            wait_for(mounted, MOUNT_TIMEOUT, "the lazy file system to mount", describe=self.log_tail)
        except BaseException:
            # No fixture teardown runs for a setup that failed: leave no process and no mount behind.
            self._abandon()
            raise

    def command(self, line: str) -> str:
        """Send one control command; its answer without the leading "ok"."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONTROL_TIMEOUT)
            sock.connect(str(self.control))
            sock.sendall(line.encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        text = answer.decode().strip()
        if not text.startswith("ok"):
            raise AssertionError(f"lazyfs answered {text!r} to {line!r}")
        return text[2:].strip()

    def power_cut(self) -> None:
        """Forget all that was not durable, and mount again on what the backing directory kept.

        The caller has killed every process that used the mount.
        """
        self.cut()
        self.remount()

    def cut(self) -> None:
        """The power cut itself: from now on the mount answers EIO, and nothing not durable is kept.

        A held fsync (`pause_fsync`) is let go by it, failing; a process killed while
        inside it can only then die, since the kernel waits for the file system's answer.
        """
        self.command("cut")

    def remount(self) -> None:
        """Unmount the cut file system and mount what its backing directory holds; no process may use it."""
        self._unmount()
        self.cuts += 1
        self.start()

    def pause_fsync(self, name: str, when: str) -> None:
        """Hold the next fsync of a file called `name`, `before` or `after` it makes the file durable, until the cut."""
        self.command(f"hold fsync /{name} {when}")

    def tear_write(self, suffix: str) -> None:
        """The next write to a file named `...suffix` makes all but its last byte durable, then hangs to the cut."""
        self.command(f"hold write {suffix} torn")

    def paused(self) -> int:
        return int(self.command("paused"))

    def stop(self) -> None:
        """Unmount without a cut (what is not durable is gone all the same: it was only in memory)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                self.command("cut")
            self._unmount()
        else:
            # It died on its own: its mount is left "not connected" until detached.
            self._abandon()

    def _abandon(self) -> None:
        """Detach the mount (lazily: a user may still hold it) and kill the file system's process."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True, check=False)
        kill_session(self.proc, UNMOUNT_TIMEOUT)

    def _unmount(self) -> None:
        assert self.proc is not None
        errors: list[str] = []

        def unmounted() -> bool:
            command = ["fusermount3", "-u", str(self.mountpoint)]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            errors.append(result.stderr.strip())
            return result.returncode == 0

        try:
            # A killed process's files are let go a moment after it is reaped: retry a little.
            wait_for(unmounted, UNMOUNT_TIMEOUT, "the lazy file system to unmount", interval=0.2)
        except AssertionError:
            users = self.users()
            # Detach the mount so the next start can mount again, and say who held it.
            self._abandon()
            raise AssertionError(f"unmount failed, still in use by {users}: {errors[-1]}") from None
        try:
            self.proc.wait(MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def users(self) -> dict[int, str]:
        """pid -> command line of each process with a file, or its cwd, on the mount."""
        found: dict[int, str] = {}
        prefix = str(self.mountpoint)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                links = [os.readlink(proc / "cwd")] + [os.readlink(fd) for fd in (proc / "fd").iterdir()]
                if any(link.startswith(prefix) for link in links):
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        return found

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
