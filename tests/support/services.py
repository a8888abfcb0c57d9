"""What the services the tests start (gunicorn, nginx, PostgreSQL) share: a free port, and skip-or-fail.

A test that needs something the machine lacks (nginx, PostgreSQL, a mount) skips, unless
``NEXUS_TEST_REQUIRE_SERVICES=1`` says every service must be there (CI): then it fails.
"""

from __future__ import annotations

import os
import socket
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
