"""Operator endpoints: /metrics, /admin/status, /admin/dead-letters and their retry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import orjson

from .. import metrics
from ..deadletters import DeadLetter, DeadLetterStore
from ..status import ServiceStatus
from .errors import ApiError
from .middleware import admin_only

DEFAULT_PAGE = 100
MAX_PAGE = 1000
ADMIN_UNAUTHORIZED = "the admin bearer token is required"


class MetricsResource:
    """Prometheus text over all workers, open to anyone (NEXUS_METRICS_PUBLIC)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = metrics.render()


class AdminMetricsResource(MetricsResource):
    """Prometheus text over all workers, behind the admin token (the default)."""

    unauthorized_message = ADMIN_UNAUTHORIZED
    authorize = staticmethod(admin_only)


class StatusResource:
    """What this worker and its data directory hold right now."""

    unauthorized_message = ADMIN_UNAUTHORIZED
    authorize = staticmethod(admin_only)

    def __init__(self, status: Callable[[], ServiceStatus]) -> None:
        self._status = status

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        s = self._status()
        body = {
            "worker": {"pid": s.pid, "state": s.state, "wal_directory": s.wal_directory},
            # orjson writes a dataclass as an object of its fields.
            "destinations": s.destinations,
            "wal": {"pending": s.wal_pending, "size_bytes": s.wal_size_bytes, "segments": s.wal_segments},
            "dead_letters": s.dead_letters,
            "workers": s.wal_directories,
        }
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(body)


def _letter(letter: DeadLetter) -> dict[str, Any]:
    e = letter.entry
    return {
        "payload_id": e.payload_id,
        "source": e.source,
        "destination": e.destination,
        "subject": e.subject,
        "idempotency_key": e.idempotency_key,
        "received_at": e.received_at,
        "failed_at": letter.failed_at,
        "attempts": letter.attempts,
        "last_error": letter.error,
        "status": letter.status,
        "payload_bytes": len(e.payload),
    }


class DeadLettersResource:
    """GET: the dead letters, by payload_id, with their last error and attempt count."""

    unauthorized_message = ADMIN_UNAUTHORIZED
    authorize = staticmethod(admin_only)

    def __init__(self, store: DeadLetterStore) -> None:
        self._store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=DEFAULT_PAGE)
        after = req.get_param("after")
        letters = self._store.page(limit=limit + 1, after=after)
        more = len(letters) > limit
        letters = letters[:limit]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(
            {"dead_letters": [_letter(x) for x in letters], "next": letters[-1].entry.payload_id if more else None}
        )


class DeadLetterRetryResource:
    """POST: put a dead letter back to PENDING and deliver it again."""

    unauthorized_message = ADMIN_UNAUTHORIZED
    authorize = staticmethod(admin_only)

    def __init__(self, retry: Callable[[str], bool]) -> None:
        self._retry = retry

    def on_post(self, req: falcon.Request, resp: falcon.Response, payload_id: str) -> None:
        # A WalUnavailable from the retry is answered 503 by http/app.py's handler.
        if not self._retry(payload_id):
            raise ApiError(falcon.HTTP_404, "unknown_dead_letter", f"no dead letter {payload_id!r}")
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"payload_id": payload_id, "status": "retrying"})
