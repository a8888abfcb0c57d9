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
def captured_logs() -> Iterator[io.StringIO]:
    """The service's JSON log lines, written to a buffer instead of stdout."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("INFO", json=True, stream=stream)
    try:
        yield stream
    finally:
        # configure_logging sets structlog's global config and the root logger.
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    """Starts gunicorns under tmp_path; kills whatever is left at teardown."""
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()
