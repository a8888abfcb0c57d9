"""What the services the tests start (gunicorn, nginx, PostgreSQL) share: a free port, skip-or-fail, a session.

A test that needs something the machine lacks (nginx, PostgreSQL, a mount) skips, unless
``NEXUS_TEST_REQUIRE_SERVICES=1`` says every service must be there (CI): then it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest

HOST = "127.0.0.1"
REQUIRE_ENV = "NEXUS_TEST_REQUIRE_SERVICES"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when the environment requires every service."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listened on a moment ago (bind to port 0 and ask the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_in_session(
    command: Sequence[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `command` in a session of its own, its stdout and stderr appended to `log_path`.

    Its own session: one `killpg` (see `kill_session`) ends it and every child it forked,
    even after the leader itself was killed.
    """
    # O_APPEND: a master and its workers write whole lines to the one file.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_session(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGKILL the process group `proc` leads, and wait up to `timeout` for `proc` to be reaped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


def read_log(log_path: Path) -> str:
    """What a process wrote to `log_path` so far; empty before the file exists."""
    try:
        return log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
