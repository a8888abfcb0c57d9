"""The one place that wires a worker together and takes it apart.

`boot` runs in each gunicorn worker after gevent's monkey-patching (wsgi.py is
imported then), so the WAL lock, the threads and the greenlets all belong to the
worker. `shutdown` is the once-guarded drain every exit path calls.
"""

from __future__ import annotations

from typing import Any

import falcon

from .config import Settings, load_settings
from .http.app import create_app
from .logs import configure_logging, get_logger
from .service import Service

_service: Service | None = None


def boot(settings: Settings | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    """Load the configuration, start this worker's service and return its WSGI app."""
    global _service
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    log = get_logger("nexus_gevent")
    for path in settings.generated_secrets:
        log.debug("secret_file", path=str(path))
    service = Service(settings, log)
    service.start()
    _service = service
    return create_app(service, log)


def current() -> Service | None:
    """The service of this worker, once booted."""
    return _service


def begin_shutdown() -> None:
    """Refuse new writes at once; safe inside a signal handler (it never blocks)."""
    if _service is not None and _service.state in ("starting", "replaying", "ready"):
        _service.state = "draining"


def shutdown(timeout: float | None, *, heartbeat: Any = None) -> bool:
    """Drain this worker's service within `timeout` seconds, once; True when it drained.

    `heartbeat` is called every second meanwhile, so gunicorn's worker timeout does
    not take a drain that is on time for a hung worker.
    """
    if _service is None:
        return True
    import gevent

    beats = gevent.spawn(_beat, heartbeat) if heartbeat is not None else None
    try:
        return _service.shutdown(timeout)
    finally:
        if beats is not None:
            beats.kill()


def _beat(heartbeat: Any) -> None:
    import gevent

    while True:
        try:
            heartbeat()
        except Exception:
            return
        gevent.sleep(1.0)
