"""Cross-cutting request work: request ids, a clean log context, one log line per request."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import falcon
import structlog

#: A client's X-Request-Id is echoed only if it is short and harmless in a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Gives each request an id and a fresh log context, and logs it once when done.

    The context is cleared at the start of every request: one greenlet serves every
    request of a keep-alive connection, so values bound for one request would
    otherwise leak into the next.
    """

    def __init__(self, logger: Any) -> None:
        # A concrete bound logger, built once: a lazy proxy would rebuild one on every
        # request (logging is configured before the app is built).
        self._log = logger.bind()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        structlog.contextvars.clear_contextvars()
        given = req.get_header("X-Request-Id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        req.context.request_id = request_id
        req.context.started = time.perf_counter()
        resp.set_header("X-Request-Id", request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        started = getattr(req.context, "started", None)
        duration_ms = round((time.perf_counter() - started) * 1000, 3) if started is not None else None
        self._log.info(
            "request",
            method=req.method,
            path=req.path,
            status=int(resp.status_code),
            duration_ms=duration_ms,
            source=getattr(req.context, "source", None),
            payload_id=getattr(req.context, "payload_id", None),
        )
        structlog.contextvars.clear_contextvars()
