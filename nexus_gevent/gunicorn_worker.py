"""gunicorn's gevent worker, with the drain at its end.

Imported by the gunicorn master, so it must not import the service at module
level (psycopg decides at first import whether to cooperate with gevent).
"""

from __future__ import annotations

import gc
import signal
import sys
import time
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

from ._sockets import shut_down

_LIFECYCLE = "nexus_gevent.lifecycle"
#: Kept between the drain's deadline and gunicorn's SIGKILL, for closing files.
DRAIN_MARGIN_SECONDS = 5.0
#: The master's stop signals: SIGTERM (graceful), SIGINT and SIGQUIT (quick).
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


def drain_budget(drain_timeout: float, graceful_timeout: float, spent: float = 0.0) -> float:
    """The drain's timeout: as configured, but always inside gunicorn's graceful_timeout.

    `spent` is the time since the stop signal (finishing open requests): the master's
    SIGKILL deadline counts from the signal, not from the start of the drain.
    """
    return max(0.0, min(drain_timeout, graceful_timeout - DRAIN_MARGIN_SECONDS - spent))


class _IdleWait:
    """gunicorn's wait for a keep-alive connection's next request, marked as idle while it lasts."""

    def __init__(self, idle: set[Any], timeout: Any) -> None:
        self._idle = idle
        self._timeout = timeout
        self._greenlet: Any = None

    def __enter__(self) -> _IdleWait:
        self._greenlet = gevent.getcurrent()
        self._idle.add(self._greenlet)
        self._timeout.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        self._idle.discard(self._greenlet)
        swallowed: bool | None = self._timeout.__exit__(*exc)
        return swallowed


class NexusWorker(GeventWorker):  # type: ignore[misc]
    """Stops taking writes on SIGTERM, finishes open requests, then drains with heartbeats.

    The drain runs inside run(), where `notify()` still works: a worker leaving on
    its own (max_requests) is watched by the heartbeat timeout, not by
    graceful_timeout, and would otherwise be killed mid-drain.

    Idle keep-alive connections are closed once the worker stops: gunicorn's gevent
    worker otherwise waits for them until graceful_timeout (benoitc/gunicorn#3227),
    and the master, whose SIGKILL deadline is that same graceful_timeout, kills the
    worker before its drain has run. nginx keeps upstream connections open, so this
    would be every shutdown in production.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The greenlet serving each open connection, and its socket.
        self._connections: dict[Any, Any] = {}
        #: Greenlets waiting for a connection's next request (none is inside a request).
        self._idle: set[Any] = set()
        #: Greenlets whose connection notify() shut down: they must not run a request.
        self._closed: set[Any] = set()
        #: When the first stop signal arrived (monotonic), for the drain's budget.
        self._stop_signalled_at: float | None = None

    def init_process(self) -> None:
        """Hold the stop signals back until this worker's own handlers are installed.

        Until init_signals(), which gunicorn runs only after monkey-patching (about
        0.3 s here), the child still has the master's handlers, and they would
        put a SIGTERM into the master's copied signal queue, where nobody reads it:
        a worker booting while the master stops would ignore its SIGTERM, never
        drain, and be SIGKILLed at graceful_timeout. Blocked, the signal stays
        pending and is delivered as soon as init_signals() unblocks it.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        super().init_process()

    def load_wsgi(self) -> None:
        """Load the app (booting the service), then freeze what it loaded out of the collector's sight.

        Everything loaded by now (gunicorn, Falcon, gevent, our modules and the service)
        lives as long as the worker. Left to the cyclic collector, every full collection
        walked all of it and stalled each request in flight for 50-80 ms; frozen, a full
        collection takes under a millisecond. Frozen objects are still freed by reference
        counting.
        """
        super().load_wsgi()
        gc.collect()
        gc.freeze()

    def init_signals(self) -> None:
        super().init_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        me = gevent.getcurrent()
        self._connections[me] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._connections.pop(me, None)
            self._closed.discard(me)

    def timeout_ctx(self) -> _IdleWait:
        return _IdleWait(self._idle, super().timeout_ctx())

    def notify(self) -> None:
        """Heartbeat; once stopping, also close the connections that wait idle for a next request.

        gunicorn's run() calls this every second while it waits for open connections
        after it stopped accepting, so a connection that goes idle later (its request
        started before the stop and was answered keep-alive) is closed on the next beat.
        It runs in the main greenlet: every greenlet in `_idle` is blocked reading.
        """
        super().notify()
        if not self.alive:
            for greenlet in list(self._idle):
                sock = self._connections.get(greenlet)
                if sock is not None:
                    self._closed.add(greenlet)
                    shut_down(sock)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
        """Run a request, unless its connection was shut down for the stop.

        A request already in the socket's buffer when the connection was shut down can
        still be read; answered, its response could not be sent, so its client would
        not know the entry was stored, and would retry it. Not running it means the
        client's retry is the only copy.
        """
        if gevent.getcurrent() in self._closed:
            return False
        return bool(super().handle_request(listener_name, req, sock, addr))

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._stop_signalled_at is None:
            self._stop_signalled_at = time.monotonic()
        super().handle_exit(sig, frame)
        # Never import inside a signal handler: it may interrupt that very import.
        # The signal may arrive while wsgi.py is still being imported: the module is
        # then in sys.modules but half-initialised. run() calls begin_shutdown anyway.
        begin_shutdown = getattr(sys.modules.get(_LIFECYCLE), "begin_shutdown", None)
        if begin_shutdown is not None:
            begin_shutdown()

    def run(self) -> None:
        super().run()
        lifecycle = sys.modules.get(_LIFECYCLE)
        if lifecycle is None:
            return  # an app that is not ours (the benchmark's bare ceiling)
        service = lifecycle.current()
        if service is None:
            return
        lifecycle.begin_shutdown()
        signalled = self._stop_signalled_at
        spent = 0.0 if signalled is None else time.monotonic() - signalled
        budget = drain_budget(service.settings.drain_timeout, self.cfg.graceful_timeout, spent)
        lifecycle.shutdown(budget, heartbeat=self.notify)
