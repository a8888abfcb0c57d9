"""GET /query/{destination}: read what has been delivered, oldest first, with a cursor."""

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
    """Accepts the admin token, or the token of a source that writes to this destination."""

    unauthorized_message = "a valid bearer token is required"

    def __init__(self, settings: Settings, destinations: Mapping[str, object]) -> None:
        self._settings = settings
        self._destinations = destinations

    def authorize(self, principal: Principal, params: dict[str, Any]) -> None:
        """404 (to a caller with a token) for no such destination; 403 for a source writing elsewhere."""
        destination = params["destination"]
        if destination not in self._destinations:
            raise ApiError(falcon.HTTP_404, "unknown_destination", f"no destination named {destination!r}")
        if not principal.is_admin:
            source = self._settings.source(principal.source or "")
            if source is None or source.destination != destination:
                raise ApiError(falcon.HTTP_403, "source_mismatch", "this token's source does not write here")

    def on_get(self, req: falcon.Request, resp: falcon.Response, destination: str) -> None:
        target = self._destinations[destination]
        if not hasattr(target, "query"):
            raise ApiError(falcon.HTTP_501, "not_queryable", "this destination cannot be read back")
        limit = self._limit(req)
        try:
            records, next_cursor = _as_queryable(target).query(
                source=req.get_param("source"),
                subject=req.get_param("subject"),
                limit=limit,
                after=req.get_param("after"),
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
