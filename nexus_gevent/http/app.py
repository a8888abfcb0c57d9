"""The Falcon app: routes, middleware and the one place errors are mapped."""

from __future__ import annotations

from typing import Any

import falcon

from ..auth import Authenticator
from ..service import Service
from .admin import DeadLetterRetryResource, DeadLettersResource, MetricsResource, StatusResource
from .errors import serialize_error, unexpected_error_handler
from .inbound import InboundResource
from .middleware import RequestContext
from .probes import HealthResource, ReadyResource
from .query import QueryResource


def create_app(service: Service, logger: Any) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of one worker, serving `service` (already started)."""
    settings = service.settings
    auth = Authenticator(settings)
    app = falcon.App(middleware=[RequestContext(logger)])
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, unexpected_error_handler(logger))
    # Falcon's own HTTPError handler must win over the catch-all above.
    app.add_error_handler(falcon.HTTPError, _reraise_http_error)
    app.add_route("/inbound/{source}", InboundResource(settings, auth, service.ingest, lambda: service.state))
    app.add_route("/query/{destination}", QueryResource(settings, auth, service.destinations))
    app.add_route("/health", HealthResource())
    app.add_route("/metrics", MetricsResource(auth, settings.metrics_public))
    app.add_route("/admin/status", StatusResource(auth, service))
    app.add_route("/admin/dead-letters", DeadLettersResource(auth, service))
    app.add_route("/admin/dead-letters/{payload_id}/retry", DeadLetterRetryResource(auth, service))
    app.add_route("/ready", ReadyResource(service.not_ready_reasons))
    return app


def _reraise_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict[str, Any]
) -> None:
    raise ex
