"""GET /health (liveness) and GET /ready (readiness)."""

from __future__ import annotations

from collections.abc import Callable

import falcon
import orjson


class HealthResource:
    """200 while the process can serve at all."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"ok"}'


class ReadyResource:
    """503 with the reasons while replaying, draining, the WAL is unwritable or a destination is down."""

    def __init__(self, reasons: Callable[[], list[str]]) -> None:
        self._reasons = reasons

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        reasons = self._reasons()
        resp.content_type = falcon.MEDIA_JSON
        if reasons:
            resp.status = falcon.HTTP_503
            resp.data = orjson.dumps(
                {"error": "not_ready", "message": "not ready: " + ", ".join(reasons), "details": {"reasons": reasons}}
            )
        else:
            resp.data = b'{"status":"ready"}'
