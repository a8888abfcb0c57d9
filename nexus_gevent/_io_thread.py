"""One OS thread that runs blocking calls for the hub: the WAL's file work, a SQLite connection.

gevent's ThreadPool(1) does this too, but builds a result object, an async watcher
and a greenlet per call, and hands each task over through a condition variable:
about 50-60 us of CPU a round trip on this VM, several times a write at moderate
load. Here a call is a tuple put on a C SimpleQueue, the thread appends its result
to a deque, and one async watcher, made once, wakes the hub, which switches back to
each caller's Waiter.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.monkey
from gevent.hub import Waiter

T = TypeVar("T")

# The unpatched primitives: the thread must block for real, not as a greenlet.
_start_thread: Callable[..., int] = gevent.monkey.get_original("_thread", "start_new_thread")
_SimpleQueue: Any = gevent.monkey.get_original("queue", "SimpleQueue")

#: Put on the queue to end the thread.
_STOP = object()


class IoThread:
    """`apply(fn, args)` runs fn(*args) in the thread and returns its result; blocks only the calling greenlet.

    Calls run one at a time, in the order they were made. An exception raised by fn is
    raised in the caller (and printed by no one). A caller killed while it waits does
    not stop its call: the call finishes in the thread, only its answer is dropped.
    Build it in the process and thread whose hub will wait for it (after gunicorn's fork).
    """

    def __init__(self) -> None:
        self._calls: Any = _SimpleQueue()
        self._answers: collections.deque[tuple[Waiter[Any] | None, bool, Any]] = collections.deque()
        self._waiting = 0
        self._stopped = False
        self._hub = gevent.get_hub()
        # Unreferenced while nobody waits, so an idle thread does not keep the hub's loop alive.
        self._wake: Any = self._hub.loop.async_(ref=False)
        self._wake.start(self._answer)
        _start_thread(self._serve, ())

    def apply(self, fn: Callable[..., T], args: tuple[Any, ...] = (), kwds: dict[str, Any] | None = None) -> T:
        if self._stopped:
            raise RuntimeError("the I/O thread is stopped")
        waiter: Waiter[Any] = Waiter(self._hub)
        self._calls.put((fn, args, kwds, waiter))
        self._waiting += 1
        self._wake.ref = True
        try:
            result: T = waiter.get()
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._wake.ref = False
        return result

    def kill(self) -> None:
        """End the thread once the calls already made are answered. Idempotent."""
        if not self._stopped:
            self._stopped = True
            self._calls.put(_STOP)

    # -- the thread ---------------------------------------------------------------

    def _serve(self) -> None:
        calls, answers, wake = self._calls, self._answers, self._wake
        while True:
            call = calls.get()
            if call is _STOP:
                # The last answer: the hub closes the watcher once every earlier one is delivered.
                answers.append((None, True, _STOP))
                wake.send()
                return
            fn, args, kwds, waiter = call
            try:
                answer = (waiter, True, fn(*args, **kwds) if kwds else fn(*args))
            except BaseException as exc:
                answer = (waiter, False, exc)
            answers.append(answer)
            wake.send()

    # -- the hub --------------------------------------------------------------------

    def _answer(self) -> None:
        answers = self._answers
        while answers:
            waiter, ok, value = answers.popleft()
            if waiter is None:
                self._wake.close()
                return
            if ok:
                waiter.switch(value)
            else:
                waiter.throw(value)
