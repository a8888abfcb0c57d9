"""Group commit for a single-writer destination: batches that arrive during a write share the next transaction.

The queue's delivery greenlets write concurrently, but SQLite has one writer: their
batches wait in line for its thread anyway. Written together they share one
transaction, one fsync and one hand-off to the thread, which at saturation is about
a tenth of a write's CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import gevent
import gevent.event

from ..entry import Entry


class _Job:
    __slots__ = ("done", "entries", "error")

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.done = gevent.event.Event()
        self.error: BaseException | None = None


class GroupCommit:
    """Writes the batches that arrive while a write is in progress together, in the next write.

    Each caller still gets its own batch's outcome. When a combined write fails for
    any reason but an outage, every batch is written again alone, so a bad entry
    fails only its own batch and spends no other entry's attempts. An outage fails
    them all, as it would have one by one.
    """

    def __init__(self, write: Callable[[list[Entry]], None], outage: type[Exception]) -> None:
        self._write = write
        self._outage = outage
        self._waiting: list[_Job] = []
        self._committer: gevent.Greenlet[[], None] | None = None

    def write(self, entries: Sequence[Entry]) -> None:
        """Store `entries` (with whatever else is waiting); raises this batch's error."""
        job = _Job(list(entries))
        self._waiting.append(job)
        if self._committer is None or self._committer.dead:
            # A greenlet of its own, not the caller: a caller killed while it waits
            # (a drain that ran out of time) must not take the others' writes with it.
            # `dead` too: a greenlet killed before it ever ran skips its `finally`.
            self._committer = gevent.spawn(self._commit_waiting)
        job.done.wait()
        if job.error is not None:
            raise job.error

    def fail_waiting(self, error: BaseException) -> None:
        """Answer every batch still waiting with `error` (the destination is closing)."""
        jobs, self._waiting = self._waiting, []
        _finish(jobs, error)

    def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                jobs, self._waiting = self._waiting, []
                try:
                    self._commit(jobs)
                finally:
                    # Killed mid-write: nobody may be left waiting for an answer.
                    unanswered = [job for job in jobs if not job.done.is_set()]
                    if unanswered:
                        _finish(unanswered, self._outage("write interrupted"))
        finally:
            self._committer = None
            if self._waiting:
                # Only when killed: batches that arrived during the last write would
                # otherwise wait for a committer nobody starts.
                self.fail_waiting(self._outage("write interrupted"))

    def _commit(self, jobs: list[_Job]) -> None:
        if len(jobs) > 1 and self._write_together(jobs):
            return
        for job in jobs:
            try:
                self._write(job.entries)
            except Exception as exc:
                _finish([job], exc)
            else:
                _finish([job], None)

    def _write_together(self, jobs: list[_Job]) -> bool:
        """One write for every batch; False when one of them is at fault, unknown which."""
        try:
            self._write([entry for job in jobs for entry in job.entries])
        except self._outage as exc:
            _finish(jobs, exc)
            return True
        except Exception:
            return False
        _finish(jobs, None)
        return True


def _finish(jobs: Sequence[_Job], error: BaseException | None) -> None:
    for job in jobs:
        # Each caller raises an exception of its own: one object raised in several
        # greenlets would collect all their frames in one traceback.
        job.error = _own_copy(error) if error is not None and len(jobs) > 1 else error
        job.done.set()


def _own_copy(error: BaseException) -> BaseException:
    mine = copy.copy(error)
    mine.__cause__ = error
    return mine
