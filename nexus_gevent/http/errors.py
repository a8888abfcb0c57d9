"""Every error the API answers, in the API's one shape.

``{"error": code, "message": text, "details": {...}}``, plus ``retry_after_seconds``
when a Retry-After header is sent. Domain errors are mapped here, in one place:
http/app.py registers these handlers with ``add_error_handler``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import falcon
import orjson

from ..logs import Logger

#: The challenges of a 401: a token as Bearer (RFC 6750), or as Basic's password (RFC 7617).
WWW_AUTHENTICATE = 'Bearer realm="nexus", Basic realm="nexus"'


class ApiError(falcon.HTTPError):
    """An error response with the API's code and message."""

    def __init__(
        self,
        status: str,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if status == falcon.HTTP_401:
            # RFC 9110 section 11.6.1: a 401 names the schemes it takes (auth.presented_token).
            headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        super().__init__(status, title=code, description=message, headers=headers)
        self.error_code = code
        self.message = message
        self.details = details or {}
        self.retry_seconds = retry_after
        self.extra = extra or {}

    def to_dict(self, obj_type: type = dict) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error_code, "message": self.message, "details": self.details}
        if self.retry_seconds is not None:
            body["retry_after_seconds"] = self.retry_seconds
        body.update(self.extra)
        return body


def _code_for(error: falcon.HTTPError) -> str:
    """A snake_case code for Falcon's own errors (404 route, 405 method...)."""
    reason = error.status[4:] if isinstance(error.status, str) else str(error.status)
    return reason.strip().lower().replace(" ", "_").replace("-", "_") or "error"


def serialize_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError) -> None:
    """Falcon's error serializer: every error, ours or Falcon's, in the API's one shape."""
    if isinstance(error, ApiError):
        body = error.to_dict()
    else:
        body = {"error": _code_for(error), "message": error.description or error.title or "", "details": {}}
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(body)


def answer_error(resp: falcon.Response, error: ApiError) -> None:
    """Write `error` into `resp` as raising it would, without Falcon's exception path.

    For the answers that come by the thousand under overload (429): raising costs a
    trip through Falcon's handler lookup and the serializer, about 5 % of a 429.
    """
    resp.status = error.status
    if error.headers:
        resp.set_headers(error.headers)
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(error.to_dict())


# The two 429s that come by the thousand under overload, from /inbound and /v1/logs alike:
# their bodies depend only on a few numbers, so each is built once.


@functools.lru_cache(maxsize=128)
def rejected_body(retry_after: int) -> bytes:
    """The body of a 429 `queue_full` under the `reject` policy: nothing was stored (cached by delay)."""
    error = ApiError(
        falcon.HTTP_429,
        "queue_full",
        "the queue is full; nothing was stored, retry after the delay",
        retry_after=retry_after,
        details={"durable": False},
    )
    return orjson.dumps(error.to_dict())


@functools.lru_cache(maxsize=256)
def rate_limited_body(retry_after: int, rate: float, burst: int) -> bytes:
    """The body of a 429 `rate_limit_exceeded`: nothing was stored (cached by delay, rate and burst)."""
    error = ApiError(
        falcon.HTTP_429,
        "rate_limit_exceeded",
        f"this source is over its rate limit of {rate:g} entries a second (burst {burst}); "
        "nothing was stored, retry after the delay",
        retry_after=retry_after,
        details={"durable": False, "rate_limit_per_second": rate, "rate_limit_burst": burst},
    )
    return orjson.dumps(error.to_dict())


ErrorHandler = Callable[[falcon.Request, falcon.Response, Exception, dict[str, Any]], None]


def unavailable(code: str, message: str) -> ErrorHandler:
    """A handler answering 503 `code` with Retry-After 1 for a domain error meaning "not now"."""

    def handler(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
        raise ApiError(falcon.HTTP_503, code, message, details={"reason": str(ex)[:200]}, retry_after=1) from None

    return handler


#: WalUnavailable: nothing was made durable (disk full, I/O error), so a retry is safe.
wal_unavailable = unavailable("wal_unavailable", "the write could not be made durable; nothing was stored, retry later")
#: DestinationUnavailable: a read could not reach the destination.
destination_unavailable = unavailable("destination_unavailable", "the destination cannot be reached")


def unexpected_error_handler(logger: Logger) -> ErrorHandler:
    """The catch-all: a bug answers 500 in the API's one shape; its traceback goes to `logger`, not the client."""

    def unexpected_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]) -> None:
        # Falcon calls handlers inside its `except` block, so exc_info is this bug's traceback.
        logger.exception("request_failed", method=req.method, path=req.path, error_type=type(ex).__name__)
        raise ApiError(falcon.HTTP_500, "internal_error", "internal error") from ex

    return unexpected_error
