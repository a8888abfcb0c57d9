"""Cross-cutting request work: request ids, a clean log context, one log line per request, and who is calling."""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import re
import time
from typing import Any, Protocol

import falcon
import structlog

from ..auth import Authenticator, Principal
from ..logs import Logger
from .errors import ApiError

#: A client's X-Request-Id is echoed only if it is short and harmless in a log line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Gives each request an id and a fresh log context, and logs it once when done.

    The context is reset at the start of every request: one greenlet serves every
    request of a keep-alive connection, so values bound for one request would
    otherwise leak into the next. The request id is the only value the service binds
    per request, so its context variable is set (and unset when done) directly:
    structlog's clear_contextvars() copies the whole context and walks it, twice a
    request. Only when the context holds anything else (a key bound by a handler or a
    library) is it cleared the slow way, so no value outlives its request.
    """

    def __init__(self, logger: Logger) -> None:
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
        # structlog's own variable for the key `request_id` (what bind_contextvars sets).
        tokens = structlog.contextvars.bind_contextvars(request_id=None)
        self._request_id = tokens["request_id"].var
        structlog.contextvars.reset_contextvars(**tokens)

    def _next_id(self) -> str:
        """32 hex digits, like a client's uuid4().hex."""
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # len() of a context is O(1): more than the request id's variable in it means an
        # earlier request on this connection bound something else, which must not leak.
        if len(contextvars.copy_context()) > 1:
            structlog.contextvars.clear_contextvars()
        given = req.env.get("HTTP_X_REQUEST_ID")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else self._next_id()
        req.context.request_id = request_id
        if self._logs_requests:
            req.context.started = time.perf_counter()
        resp.set_header("X-Request-Id", request_id)
        self._request_id.set(request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if not self._logs_requests:
            # Ellipsis is structlog's "unbound" (what clear_contextvars sets).
            self._request_id.set(Ellipsis)
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
        self._request_id.set(Ellipsis)


class Guarded(Protocol):
    """A resource that only some callers may use."""

    #: The 401's message: what kind of token this resource wants.
    unauthorized_message: str

    def authorize(self, principal: Principal, params: dict[str, Any]) -> None:
        """Raise ApiError (403, or 404 for what only a caller may learn is missing) for a caller not served."""
        ...


class Authentication:
    """Identifies the caller once per request, for every resource with an `authorize` method.

    401 for a missing or unknown token is answered here; who may use what is the
    resource's own rule. Resources without `authorize` (the probes) are public. A
    method the resource does not serve answers 405 whoever asks, as before
    authentication.
    """

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        if not hasattr(resource, "authorize") or not hasattr(resource, _responder(req.method)):
            return
        guarded: Guarded = resource  # type: ignore[assignment]
        principal = self._auth.identify(req.env.get("HTTP_AUTHORIZATION"))
        if principal is None:
            raise ApiError(falcon.HTTP_401, "unauthorized", guarded.unauthorized_message)
        guarded.authorize(principal, params)
        req.context.principal = principal


def _responder(method: str) -> str:
    return _RESPONDERS.get(method) or f"on_{method.lower()}"


_RESPONDERS = {m: f"on_{m.lower()}" for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


def admin_only(principal: Principal, params: dict[str, Any]) -> None:
    """403 for a source's token: it is not the admin's."""
    if not principal.is_admin:
        raise ApiError(falcon.HTTP_403, "admin_only", "this endpoint needs the admin token")
