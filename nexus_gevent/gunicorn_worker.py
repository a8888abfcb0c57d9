"""gunicorn's gevent worker, with the drain at its end.

Imported by the gunicorn master, so it must not import the service at module
level (psycopg decides at first import whether to cooperate with gevent).
"""

from __future__ import annotations

import sys
from typing import Any

from gunicorn.workers.ggevent import GeventWorker

_LIFECYCLE = "nexus_gevent.lifecycle"
#: Kept between the drain's deadline and gunicorn's SIGKILL, for closing files.
DRAIN_MARGIN_SECONDS = 5.0


def drain_budget(drain_timeout: float, graceful_timeout: float) -> float:
    """The drain's timeout: as configured, but always inside gunicorn's graceful_timeout."""
    return max(0.0, min(drain_timeout, graceful_timeout - DRAIN_MARGIN_SECONDS))


class NexusWorker(GeventWorker):  # type: ignore[misc]
    """Stops taking writes on SIGTERM, finishes open requests, then drains with heartbeats.

    The drain runs inside run(), where `notify()` still works: a worker leaving on
    its own (max_requests) is watched by the heartbeat timeout, not by
    graceful_timeout, and would otherwise be killed mid-drain.
    """

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # Never import inside a signal handler: it may interrupt that very import.
        lifecycle = sys.modules.get(_LIFECYCLE)
        if lifecycle is not None:
            lifecycle.begin_shutdown()

    def run(self) -> None:
        super().run()
        lifecycle = sys.modules.get(_LIFECYCLE)
        if lifecycle is None:
            return  # an app that is not ours (the benchmark's bare ceiling)
        service = lifecycle.current()
        if service is None:
            return
        lifecycle.begin_shutdown()
        budget = drain_budget(service.settings.drain_timeout, self.cfg.graceful_timeout)
        lifecycle.shutdown(budget, heartbeat=self.notify)
