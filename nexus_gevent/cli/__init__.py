"""Offline operator tools, run as `python -m nexus_gevent ...`; see docs/wal-tool.md."""

from .wal_tool import EXIT_DAMAGE, EXIT_ERROR, EXIT_OK, main

__all__ = ["EXIT_DAMAGE", "EXIT_ERROR", "EXIT_OK", "main"]
