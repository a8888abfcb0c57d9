"""Fixtures shared by every test module; each one undoes the global state it touches."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from nexus_gevent.logs import configure_logging
from tests.support.proc import Launcher


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
