"""Operator endpoints: /metrics, /admin/status, /admin/dead-letters and their retry."""

from __future__ import annotations

import os
from typing import Any

import falcon
import orjson

from .. import metrics
from ..auth import Authenticator
from ..deadletters import DeadLetter
from ..errors import WalUnavailable
from ..service import Service
from ..wal.dirlock import LOCK_NAME, existing_dirs
from .errors import ApiError

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def require_admin(auth: Authenticator, req: falcon.Request) -> None:
    """401 without a known token; 403 for a source's token (it is not the admin's)."""
    principal = auth.identify(req.get_header("Authorization"))
    if principal is None:
        raise ApiError(falcon.HTTP_401, "unauthorized", "the admin bearer token is required")
    if not principal.is_admin:
        raise ApiError(falcon.HTTP_403, "admin_only", "this endpoint needs the admin token")


class MetricsResource:
    """Prometheus text over all workers; behind the admin token unless the config opens it."""

    def __init__(self, auth: Authenticator, public: bool) -> None:
        self._auth = auth
        self._public = public

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._public:
            require_admin(self._auth, req)
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = metrics.render()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wal_dirs(service: Service) -> list[dict[str, Any]]:
    """Every WAL directory, with the pid that last held it and whether that pid lives."""
    rows: list[dict[str, Any]] = []
    own = service.lock.path if service.lock is not None else None
    for path in existing_dirs(service.data_dir / "wal"):
        try:
            pid = int((path / LOCK_NAME).read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        rows.append(
            {
                "directory": path.name,
                "pid": pid or None,
                "alive": bool(pid) and _pid_alive(pid),
                "this_worker": path == own,
            }
        )
    return rows


class StatusResource:
    """What this worker and its data directory hold right now."""

    def __init__(self, auth: Authenticator, service: Service) -> None:
        self._auth = auth
        self._service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_admin(self._auth, req)
        s = self._service
        wal = s.wal
        body = {
            "worker": {"pid": os.getpid(), "state": s.state, "wal_directory": s.lock.path.name if s.lock else None},
            "destinations": {
                name: {
                    "queue_depth": lane.queue.depth,
                    "queue_capacity": lane.queue.capacity,
                    "backlog": lane.backlog,
                    "available": lane.queue.destination_available,
                    "retry_after_seconds": lane.retry_after(),
                }
                for name, lane in s.lanes.items()
            },
            "wal": {
                "pending": wal.pending_count if wal else 0,
                "size_bytes": wal.size_bytes if wal else 0,
                "segments": wal.segment_count if wal else 0,
            },
            "dead_letters": s.dead_letters.count() if s.dead_letters else 0,
            "workers": _wal_dirs(s),
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

    def __init__(self, auth: Authenticator, service: Service) -> None:
        self._auth = auth
        self._service = service

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        require_admin(self._auth, req)
        limit = req.get_param_as_int("limit", min_value=1, max_value=MAX_PAGE, default=DEFAULT_PAGE)
        after = req.get_param("after")
        store = self._service.dead_letters
        letters = store.page(limit=limit + 1, after=after) if store else []
        more = len(letters) > limit
        letters = letters[:limit]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(
            {"dead_letters": [_letter(x) for x in letters], "next": letters[-1].entry.payload_id if more else None}
        )


class DeadLetterRetryResource:
    """POST: put a dead letter back to PENDING and deliver it again."""

    def __init__(self, auth: Authenticator, service: Service) -> None:
        self._auth = auth
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response, payload_id: str) -> None:
        require_admin(self._auth, req)
        try:
            found = self._service.retry_dead_letter(payload_id)
        except WalUnavailable as exc:
            raise ApiError(
                falcon.HTTP_503,
                "wal_unavailable",
                "the retry could not be made durable",
                details={"reason": str(exc)[:200]},
                retry_after=1,
            ) from None
        if not found:
            raise ApiError(falcon.HTTP_404, "unknown_dead_letter", f"no dead letter {payload_id!r}")
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"payload_id": payload_id, "status": "retrying"})
