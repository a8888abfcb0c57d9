"""The Falcon app: routes, middleware and the one place errors are mapped to HTTP."""

from __future__ import annotations

from typing import Any

import falcon

from ..auth import Authenticator
from ..destinations import PayloadCheck
from ..errors import DestinationUnavailable, WalUnavailable
from ..logs import Logger
from ..service import Service
from .admin import AdminMetricsResource, DeadLetterRetryResource, DeadLettersResource, MetricsResource, StatusResource
from .errors import destination_unavailable, serialize_error, unexpected_error_handler, wal_unavailable
from .inbound import InboundResource
from .middleware import Authentication, RequestContext
from .otlp_logs import OtlpLogsResource
from .probes import HealthResource, ReadyResource
from .query import QueryResource


def create_app(service: Service, logger: Logger) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of one worker, serving `service` (already started)."""
    settings = service.settings
    app = falcon.App(middleware=(RequestContext(logger), Authentication(Authenticator(settings))))
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, unexpected_error_handler(logger))
    # Falcon's own HTTPError handler must win over the catch-all above.
    app.add_error_handler(falcon.HTTPError, _reraise_http_error)
    app.add_error_handler(WalUnavailable, wal_unavailable)
    app.add_error_handler(DestinationUnavailable, destination_unavailable)
    checks = {name: d for name, d in service.destinations.items() if isinstance(d, PayloadCheck)}
    app.add_route("/inbound/{source}", InboundResource(settings, service.ingest, lambda: service.stopping, checks))
    app.add_route("/v1/logs", OtlpLogsResource(settings, service.ingest, lambda: service.stopping, checks))
    app.add_route("/query/{destination}", QueryResource(settings, service.destinations))
    app.add_route("/health", HealthResource())
    app.add_route("/metrics", MetricsResource() if settings.metrics_public else AdminMetricsResource())
    app.add_route("/admin/status", StatusResource(service.status))
    app.add_route("/admin/dead-letters", DeadLettersResource(service.dead_letters))
    app.add_route("/admin/dead-letters/{payload_id}/retry", DeadLetterRetryResource(service.retry_dead_letter))
    app.add_route("/ready", ReadyResource(service.not_ready_reasons))
    return app


def _reraise_http_error(
    req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict[str, Any]
) -> None:
    raise ex
