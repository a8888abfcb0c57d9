"""IoThread: blocking calls run in one OS thread, one at a time, and each caller gets its own answer."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest

from nexus_gevent._io_thread import IoThread

#: Far above any healthy wait here.
DEADLINE = 10.0


@pytest.fixture
def io_thread() -> Iterator[IoThread]:
    """A fresh I/O thread, ended after the test."""
    thread = IoThread()
    yield thread
    thread.kill()


def test_a_call_runs_in_another_os_thread_and_returns_its_value(io_thread: IoThread) -> None:
    """apply() returns what the function returned, computed in a thread that is not the caller's."""
    caller = threading.get_ident()

    ident, total = io_thread.apply(lambda a, b: (threading.get_ident(), a + b), (2, 3))

    assert total == 5
    assert ident != caller


def test_an_exception_is_raised_in_the_caller(io_thread: IoThread) -> None:
    """An exception raised by the function reaches the caller as it is."""

    def fail() -> None:
        raise ValueError("disk says no")

    with pytest.raises(ValueError, match="disk says no"):
        io_thread.apply(fail)


def test_concurrent_callers_each_get_their_own_answer_in_call_order(io_thread: IoThread) -> None:
    """Fifty greenlets calling at once each get their own result, and the calls ran in the order made."""
    ran: list[int] = []

    def work(n: int) -> int:
        ran.append(n)
        return n * n

    greenlets = [gevent.spawn(io_thread.apply, work, (n,)) for n in range(50)]
    gevent.joinall(greenlets, timeout=DEADLINE, raise_error=True)

    assert [g.value for g in greenlets] == [n * n for n in range(50)]
    assert ran == list(range(50))


def test_other_greenlets_run_while_a_call_blocks(io_thread: IoThread) -> None:
    """While the thread blocks, the hub keeps running greenlets: only the caller waits."""
    release = threading.Event()
    ticks: list[int] = []

    def tick() -> None:
        for n in range(3):
            ticks.append(n)
            gevent.sleep(0)
        release.set()

    ticker = gevent.spawn(tick)
    assert io_thread.apply(lambda: release.wait(DEADLINE)) is True
    ticker.join()

    assert ticks == [0, 1, 2]


def test_a_killed_caller_leaves_the_call_to_finish_and_the_thread_serving(io_thread: IoThread) -> None:
    """Killing a waiting caller drops only its answer: its call still completes, and later calls are served."""
    release = threading.Event()
    done = threading.Event()

    def slow() -> None:
        release.wait(DEADLINE)
        done.set()

    caller = gevent.spawn(io_thread.apply, slow)
    gevent.sleep(0)  # the call is made
    caller.kill()
    release.set()

    assert io_thread.apply(lambda: "next") == "next"
    assert done.is_set()


def test_kill_answers_the_calls_already_made_and_refuses_new_ones() -> None:
    """After kill(), calls made before it are still answered; a new call is refused."""
    thread = IoThread()
    release = threading.Event()
    first = gevent.spawn(thread.apply, lambda: release.wait(DEADLINE) and "first")
    gevent.sleep(0)

    thread.kill()
    release.set()

    assert first.get(timeout=DEADLINE) == "first"
    with pytest.raises(RuntimeError):
        thread.apply(lambda: None)


def test_only_a_waiting_call_keeps_the_hub_loop_alive(io_thread: IoThread) -> None:
    """The thread's wake-up watcher holds the hub's loop only while a caller waits, so an idle worker can exit."""
    release = threading.Event()
    during: list[bool] = []

    def watch() -> None:
        during.append(io_thread._wake.ref)
        release.set()

    caller = gevent.spawn(io_thread.apply, lambda: release.wait(DEADLINE))
    gevent.sleep(0)
    watch()
    caller.join(timeout=DEADLINE)

    assert during == [True]
    assert io_thread._wake.ref is False


def test_a_timed_out_caller_gets_timeout_and_the_next_call_its_own_answer(io_thread: IoThread) -> None:
    """gevent.Timeout ends only the wait: the late answer goes nowhere, and the next call gets its own."""
    release = threading.Event()

    with pytest.raises(gevent.Timeout), gevent.Timeout(0.01):
        io_thread.apply(lambda: release.wait(DEADLINE) and "late")
    release.set()

    assert io_thread.apply(lambda: "own") == "own"


#: Run in a fresh interpreter: monkey-patching is for the whole process.
_PATCHED_PROGRAM = """
from gevent import monkey; monkey.patch_all()
import threading, gevent
from nexus_gevent._io_thread import IoThread
real_event = monkey.get_original("threading", "Event")()
thread = IoThread()
ticks = []
def tick():
    while len(ticks) < 5:
        ticks.append(1)
        gevent.sleep(0.001)
    real_event.set()
ticker = gevent.spawn(tick)
# A real (unpatched) blocking wait in the thread: the hub must keep ticking meanwhile.
assert thread.apply(real_event.wait, ({deadline},)) is True
native = thread.apply(threading.get_native_id)
assert native != threading.get_native_id(), native
print("ok", len(ticks))
"""


def test_under_monkey_patching_the_thread_is_a_real_os_thread() -> None:
    """With gevent.monkey.patch_all(), a call that blocks for real in the thread leaves the hub running greenlets."""
    program = _PATCHED_PROGRAM.format(deadline=DEADLINE)
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "5"]
