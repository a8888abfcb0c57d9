"""gunicorn settings for nexus_gevent.

Imported by the master before any monkey-patching: it must not import the
service (see docs/design.md, "Boot order"). nexus_gevent.datadir is safe at the
top: it only names paths, imports nothing else and opens no file.
"""

import os
import shutil
from pathlib import Path

from nexus_gevent import datadir

# Everything the service writes (WAL, SQLite files, generated secrets, metrics files)
# is its user's alone, whatever umask it was started under; workers inherit it.
os.umask(0o077)

# prometheus_client's multiprocess mode: every worker writes its values under this
# folder and /metrics sums them. It must be set before any worker starts, and it is
# emptied at each start (on_starting), so old workers' counters do not linger.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    str(datadir.metrics_dir(Path(os.environ.get(datadir.DATA_DIR_ENV) or datadir.DEFAULT_DATA_DIR))),
)

_drain_timeout = float(os.environ.get("NEXUS_DRAIN_TIMEOUT", "20"))

bind = os.environ.get("NEXUS_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "nexus_gevent.gunicorn_worker.NexusWorker"
worker_connections = 1000
# The drain must fit inside both: graceful_timeout bounds a SIGTERM'd worker, the
# heartbeat timeout one leaving by itself (the drain also sends heartbeats).
graceful_timeout = int(_drain_timeout) + 10
timeout = int(_drain_timeout) + 10
# Above nginx's upstream keepalive_timeout (60 s in deploy/nginx.conf), so nginx
# never reuses a connection gunicorn has just closed ("upstream prematurely closed").
keepalive = 75
preload_app = False
logger_class = "nexus_gevent.logs.GunicornLogger"
accesslog = None
control_socket_disable = True
max_requests = int(os.environ.get("NEXUS_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("NEXUS_MAX_REQUESTS_JITTER", "0"))


def on_starting(server):  # type: ignore[no-untyped-def]
    """Generate missing secrets once in the master, and say where they are; empty the metrics folder."""
    from nexus_gevent.config import load_settings
    from nexus_gevent.secrets import ensure_private_dir

    # Settings first: they create the data directory 0700. The metrics folder lives in
    # it, and os.makedirs would have made the missing data directory with the umask's mode.
    settings = load_settings()
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    ensure_private_dir(Path(_metrics_dir))
    for path in settings.generated_secrets:
        server.log.info("generated secret kept in %s (mode 0600)", path)


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """Backstop for exits that skip the worker's own drain (SIGQUIT, SIGINT)."""
    from nexus_gevent import lifecycle
    from nexus_gevent.gunicorn_worker import drain_budget

    service = lifecycle.current()
    if service is not None:
        lifecycle.begin_shutdown()
        lifecycle.shutdown(drain_budget(service.settings.drain_timeout, server.cfg.graceful_timeout))


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Drop a dead worker's live gauges (queue depth, WAL pending) from /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
