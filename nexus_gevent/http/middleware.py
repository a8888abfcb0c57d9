"""Cross-cutting request work: request ids, a clean log context, one log line per request."""

from __future__ import annotations

import itertools
import logging
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
        # Request ids need to be unique, not secret: a random per-process prefix and a
        # counter, rather than a getrandom() syscall per request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)
        # The level is fixed when logging is configured; below INFO the line is never
        # written, so its fields need not be gathered.
        enabled = getattr(self._log, "is_enabled_for", None)
        self._logs_requests = enabled is None or bool(enabled(logging.INFO))

    def _next_id(self) -> str:
        """32 hex digits, like a client's uuid4().hex."""
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        structlog.contextvars.clear_contextvars()
        given = req.get_header("X-Request-Id")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else self._next_id()
        req.context.request_id = request_id
        if self._logs_requests:
            req.context.started = time.perf_counter()
        resp.set_header("X-Request-Id", request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not self._logs_requests:
            structlog.contextvars.clear_contextvars()
            return
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
