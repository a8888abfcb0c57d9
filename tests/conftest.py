"""Fixtures shared by every test module; each one undoes the global state it touches."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog

from nexus_gevent.logs import configure_logging
from tests.support.lazyfs import LazyMount, require_fuse
from tests.support.proc import Launcher

if TYPE_CHECKING:
    from tests.test_http import Harness, Node


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Puts back what configure_logging changes process-wide: structlog's config and context, the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def captured_logs(restore_logging: None) -> io.StringIO:
    """The service's JSON log lines, written to a buffer instead of stdout."""
    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    return stream


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Starts gunicorns under tmp_path; kills whatever is left at teardown."""
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyMount]:
    """The lazy FUSE file system (tests/support/lazyfs_server.py) mounted under tmp_path, unmounted at the end."""
    require_fuse()
    mount = LazyMount(tmp_path)
    mount.start()
    yield mount
    mount.stop()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """In-process services on one data directory (tests/test_http.py's Harness), all shut down at the end."""
    from tests.test_http import Harness

    harness = Harness(tmp_path)
    yield harness
    harness.close()


@pytest.fixture
def node(harness: Harness) -> Node:
    """One started in-process service with the default settings, and a TestClient on it."""
    return harness.start()
