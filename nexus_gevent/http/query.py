"""GET /query/{destination}: read what has been delivered, oldest first, with a cursor.

A source's token reads its own records, and those of the sources its `can_read`
names; the admin token reads all. A page is cut by `limit` and by a byte budget
(NEXUS_QUERY_PAGE_BYTES), and each payload is handed back as the JSON text stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import falcon
import orjson

from ..auth import Principal
from ..config import Settings
from ..destinations import Queryable
from .errors import ApiError

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


class QueryResource:
    """Accepts the admin token, or the token of a source whose readable records live in this destination."""

    unauthorized_message = "a valid bearer token is required"

    def __init__(self, settings: Settings, destinations: Mapping[str, object]) -> None:
        self._settings = settings
        self._destinations = destinations

    def _readable(self, principal: Principal, destination: str) -> list[str] | None:
        """The sources whose records `principal` may read here; None for all (the admin)."""
        if principal.is_admin:
            return None
        own = self._settings.source(principal.source or "")
        if own is None:
            return []
        return sorted(
            name
            for name in own.readable
            if (source := self._settings.source(name)) is not None and source.destination == destination
        )

    def authorize(self, principal: Principal, params: dict[str, Any]) -> None:
        """404 (to a caller with a token) for no such destination; 403 for a token reading nothing here."""
        destination = params["destination"]
        if destination not in self._destinations:
            raise ApiError(falcon.HTTP_404, "unknown_destination", f"no destination named {destination!r}")
        if self._readable(principal, destination) == []:
            raise ApiError(falcon.HTTP_403, "source_mismatch", "this token reads no source stored here")

    def on_get(self, req: falcon.Request, resp: falcon.Response, destination: str) -> None:
        target = self._destinations[destination]
        if not hasattr(target, "query"):
            raise ApiError(falcon.HTTP_501, "not_queryable", "this destination cannot be read back")
        limit = self._limit(req)
        readable = self._readable(req.context.principal, destination)
        source = req.get_param("source")
        if source is not None and readable is not None and source not in readable:
            raise ApiError(
                falcon.HTTP_403,
                "source_forbidden",
                f"this token may not read source {source!r}",
                details={"readable_sources": readable},
            )
        try:
            records, next_cursor = _as_queryable(target).query(
                source=source,
                subject=req.get_param("subject"),
                limit=limit,
                after=req.get_param("after"),
                sources=readable,
                max_bytes=self._settings.query_page_bytes,
            )
        except ValueError:
            raise ApiError(
                falcon.HTTP_400, "invalid_cursor", "the 'after' cursor is not one this service gave"
            ) from None
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"records": records, "next": next_cursor})

    @staticmethod
    def _limit(req: falcon.Request) -> int:
        raw = req.get_param("limit")
        if raw is None:
            return DEFAULT_LIMIT
        # Only ASCII digits: str.isdigit() also takes "²" or "①", which int() refuses,
        # and int() takes fullwidth digits, which are no number a client meant to send.
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
            raise ApiError(falcon.HTTP_400, "invalid_limit", f"limit must be an integer from 1 to {MAX_LIMIT}")
        return int(raw)


def _as_queryable(target: object) -> Queryable:
    return target  # type: ignore[return-value]
