"""The one place that wires a worker together and takes it apart.

`boot` runs in each gunicorn worker after gevent's monkey-patching (wsgi.py is
imported then), so the WAL lock, the threads and the greenlets all belong to the
worker. `assemble` builds every part complete, in dependency order; `shutdown` is
the once-guarded drain every exit path calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import falcon

from . import datadir, metrics
from .backlog import Backlog
from .config import Settings, load_settings
from .deadletters import DeadLetterStore
from .destinations import open_destination
from .errors import DestinationUnavailable
from .http.app import create_app
from .idempotency import IdempotencyIndex
from .ingest import Ingest
from .logs import Logger, configure_logging, get_logger
from .outcomes import Outcomes
from .queue import Destination, Queue, QueueConfig
from .rate_limit import RateLimits
from .resend_window import ResendWindow
from .retry_after import RateMeter
from .service import Parts, Service
from .wal import Wal, claim

_service: Service | None = None


def boot(settings: Settings | None = None) -> falcon.App[falcon.Request, falcon.Response]:
    """Load the configuration, start this worker's service and return its WSGI app."""
    global _service
    settings = settings or load_settings()
    configure_logging(settings.log_level)
    log = get_logger("nexus_gevent")
    for path in settings.generated_secrets:
        log.debug("secret_file", path=str(path))
    service = assemble(settings, log)
    service.start()
    _service = service
    return create_app(service, log)


def assemble(settings: Settings, logger: Logger) -> Service:
    """Build one worker's parts, complete: WAL first, then stores, destinations, queues and ingest.

    The WAL directory is claimed and opened for appends before anything else, so a
    write can be made durable as soon as the app serves; replay comes later, in
    Service.start.
    """
    lock = claim(datadir.wal_root(settings.data_dir))
    log = logger.bind(wal_dir=lock.path.name)
    wal = Wal(lock.path, segment_bytes=settings.wal_segment_bytes, logger=log)
    wal.start()
    dead_letters = DeadLetterStore(datadir.dead_letters_file(settings.data_dir))
    index = IdempotencyIndex(datadir.idempotency_file(settings.data_dir), window=settings.idempotency_window)
    outcomes = Outcomes(wal, dead_letters)
    destinations: dict[str, Destination] = {}
    backlogs: dict[str, Backlog] = {}
    for dest in settings.destinations:
        destination = open_destination(dest.name, dest.url)
        destinations[dest.name] = destination
        meter = RateMeter()
        queue = Queue(
            QueueConfig(
                size=settings.queue_size,
                workers=settings.queue_workers,
                linger=settings.delivery_linger,
                max_attempts=settings.max_attempts,
                initial_backoff=settings.initial_backoff,
                on_processed=_counting(meter),
            ),
            log,
            metrics.MeteredDestination(destination, DestinationUnavailable),
            outcomes,
        )
        backlogs[dest.name] = Backlog(queue, log, meter, refill=functools.partial(wal.read_pending, dest.name))
    # One bucket file per limited source in the data directory: every worker maps the
    # same files, so a source's limit holds for the whole instance (rate_limit.py).
    limits = RateLimits.open(
        datadir.rate_limit_dir(settings.data_dir),
        [
            (s.name, s.rate_limit_per_second, s.rate_limit_burst or 1)
            for s in settings.sources
            if s.rate_limit_per_second is not None
        ],
    )
    # Only a durable 429 stores what a client resends; under `reject` nothing is remembered.
    resends = (
        ResendWindow.open(settings.data_dir, window=settings.shed_resend_window)
        if settings.shed_resend_window > 0 and settings.shed_policy == "durable"
        else None
    )
    ingest = Ingest(
        wal, backlogs, index, shed_policy=settings.shed_policy, logger=log, limits=limits.buckets, resends=resends
    )
    parts = Parts(settings, lock, wal, dead_letters, index, outcomes, destinations, backlogs, ingest, limits, resends)
    return Service(parts, log)


def _counting(meter: RateMeter) -> Callable[[], None]:
    processed = metrics.FastCounter(metrics.PROCESSED)

    def on_processed() -> None:
        processed.inc()
        meter.tick()

    return on_processed


def current() -> Service | None:
    """The service of this worker, once booted."""
    return _service


def begin_shutdown() -> None:
    """Refuse new writes at once; safe inside a signal handler (it never blocks)."""
    if _service is not None:
        _service.begin_shutdown()


def shutdown(timeout: float | None, *, heartbeat: Callable[[], object] | None = None) -> bool:
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


def _beat(heartbeat: Callable[[], object]) -> None:
    import gevent

    while True:
        try:
            heartbeat()
        except Exception:
            return
        gevent.sleep(1.0)
