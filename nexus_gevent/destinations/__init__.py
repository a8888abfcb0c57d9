"""Destinations: where delivered entries are stored, chosen by the scheme of their URL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from ..errors import ConfigError
from ..queue import Destination
from .sqlite import SQLiteDestination

__all__ = ["Destination", "PayloadCheck", "Queryable", "SQLiteDestination", "open_destination", "sqlite_path"]

_SQLITE_PREFIX = "sqlite:///"


@runtime_checkable
class PayloadCheck(Protocol):
    """A destination that can tell at ingest that it will never store a payload."""

    def unstorable(self, payload: bytes, value: object) -> str | None:
        """Why this destination can never store `payload` (parsed: `value`), or None when it can."""
        ...


class Queryable(Protocol):
    """A destination that can list what it stored, for GET /query/{destination}."""

    def query(
        self,
        source: str | None = None,
        subject: str | None = None,
        limit: int = 50,
        after: str | None = None,
        *,
        sources: Sequence[str] | None = None,
        max_bytes: int = ...,
    ) -> tuple[list[dict[str, object]], str | None]:
        """Records oldest first (at most `limit`, and `max_bytes` of payloads), and the next page's cursor.

        `sources` (None: all) keeps only those sources' records. Raises ValueError for a
        malformed cursor.
        """
        ...


def sqlite_path(url: str) -> str:
    """The file path of a `sqlite:///PATH` URL: relative after three slashes, absolute after four."""
    if not url.lower().startswith(_SQLITE_PREFIX):
        raise ConfigError(
            f"destination URL {url!r}: a SQLite URL is sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = url[len(_SQLITE_PREFIX) :]
    if not path or path.endswith("/"):
        raise ConfigError(f"destination URL {url!r}: names no database file")
    # Refused rather than kept in the file name: a user writing ?mode=ro or #x means an
    # option, and silently creating a file called "nexus.db?mode=ro" would hide that.
    if "?" in path or "#" in path:
        raise ConfigError(f"destination URL {url!r}: SQLite URLs take no query or fragment")
    return path


def _open_sqlite(name: str, url: str) -> Destination:
    return SQLiteDestination(name, sqlite_path(url))


def _open_postgres(name: str, url: str) -> Destination:
    # Imported here, inside the call, never at the top of this module: psycopg decides
    # whether it cooperates with gevent when it is first imported, so that must happen
    # in the worker, after monkey-patching.
    from .postgres import PostgresDestination

    return PostgresDestination(name, url)


_OPENERS: dict[str, Callable[[str, str], Destination]] = {
    "sqlite": _open_sqlite,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
}


def open_destination(name: str, url: str) -> Destination:
    """Build the destination `name` from its URL; ConfigError for a URL we cannot serve.

    Call it in the worker process: destinations own threads and connections.
    """
    scheme, sep, _ = url.partition("://")
    opener = _OPENERS.get(scheme.lower()) if sep else None
    if opener is None:
        # Only the scheme goes in the message: the rest of a URL may hold a password.
        shown = f"scheme {scheme!r}" if sep else "a URL without a scheme"
        known = ", ".join(f"{s}://" for s in _OPENERS)
        raise ConfigError(f"destination {name!r}: unsupported {shown} (expected one of {known})")
    return opener(name, url)
