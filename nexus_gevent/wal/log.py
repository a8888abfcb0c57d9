"""The write-ahead log of one worker: group-committed appends, marks, rotation, reclaim.

Threading model: every file operation (write, fsync, open, unlink) runs in one
dedicated OS thread, so the gevent hub never waits on the disk. Every piece of
Python state (batches, accounting) lives on the hub. The thread returns results,
the hub applies them.

Group commit: appenders add their frame to the open batch and wait on its event.
One flusher greenlet takes the whole batch, writes it with one O_DSYNC write in the
thread (write and fdatasync in one syscall), and wakes every appender of that batch.
Appends arriving meanwhile form the next batch, so the batch size follows the load
by itself.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gevent
import gevent.event

from .._files import fsync_directory
from .._io_thread import IoThread
from ..entry import Entry
from ..errors import WalUnavailable
from . import records
from ._frame import Frame, encode, encode_many
from .fold import Fold, mark_status
from .replay import Progress, ReplayResult, replay_directory
from .segments import list_segments, read_segment, segment_path

T = TypeVar("T")

#: Default segment size: large enough that rotation is rare, small enough that a
#: segment whose entries are all marked is reclaimed soon after they are delivered.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


class _Batch:
    """Frames waiting for one write+fsync, and who waits for them."""

    __slots__ = ("chunks", "done", "entries", "error", "marked", "marks")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.entries: list[str] = []
        #: What the batch's marks say: (status, payload ids), one pair per mark frame.
        self.marked: list[tuple[str, list[str]]] = []
        #: The mark frames among `chunks`, kept apart so a failed write can hand them on.
        self.marks: list[bytes] = []
        self.done = gevent.event.Event()
        self.error: OSError | None = None


class Wal:
    """One worker's WAL directory. start(), then append and mark; replay() the older segments meanwhile.

    The service calls start() first, so the worker takes writes at once, and runs
    replay() in the background; until replay returns, nothing is reclaimed. Calling
    replay() before start() works too (tests and benchmarks do).
    """

    def __init__(self, directory: Path, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, logger: Any) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._log = logger
        self._pool = IoThread()
        # Thread-side state: touched only inside the I/O thread.
        self._fd = -1
        self._seg = -1
        self._offset = 0
        self._needs_rotation = False
        # Hub-side state.
        self._current = _Batch()
        self._wake = gevent.event.Event()
        self._flusher: gevent.Greenlet[Any, Any] | None = None
        self._closing = False
        self._started = False
        self._replayed = False
        #: The first segment start() opened: replay() reads only the segments below it.
        self._live_from = -1
        #: The batch the flusher is writing now, so flush() can wait for it too.
        self._writing: _Batch | None = None
        #: The fold of every record written or replayed: each pending entry's segment.
        self._live: Fold[int] = Fold()
        self._seg_pending: Counter[int] = Counter()
        self._segments: list[int] = []
        self._bytes_on_disk = 0
        #: The error of the last failed write, None once a write succeeds again.
        self.last_error: OSError | None = None

    # -- startup -------------------------------------------------------------

    def replay(self, progress: Progress | None = None) -> ReplayResult:
        """Read the older segments in the I/O thread; returns exactly the PENDING entries.

        May run before or after start(): after it, appends already go to the new
        segment while the old ones are read, so the worker takes writes at once.
        """
        below = self._live_from if self._started else None
        result: ReplayResult = self._pool.apply(replay_directory, (self.directory, progress), {"below": below})
        # The older segments' records all come before the live ones, so where both name
        # an id the live record wins (the fold's rule): an id already live (written again
        # since start, e.g. a retried dead letter) keeps its live place, and counting it
        # in its old segment too would pin that segment forever. Merged by comprehension
        # (one pass at C speed) rather than record by record through the fold.
        live = self._live.pending
        found = {pid: seg for pid, (_entry, seg) in result.pending.items() if pid not in live}
        live.update(found)
        self._seg_pending.update(found.values())
        self._segments[:0] = result.segments
        self._replayed = True
        for report in result.damage:
            self._log.error(
                "wal_damage_skipped",
                file=str(report.path),
                offset=report.offset,
                length=report.length,
                reason=report.reason,
            )
        if self._started:
            self._bytes_on_disk = self._pool.apply(self._disk_usage)
            self.reclaim()
        return result

    def start(self) -> None:
        """Open a fresh segment (never append after a possibly torn tail) and start the flusher."""
        existing = self._pool.apply(list_segments, (self.directory,))
        first = (existing[-1][0] + 1) if existing else 0
        self._pool.apply(self._open_segment, (first,))
        if not self._replayed:
            self._segments = []
        self._segments.append(first)
        self._live_from = first
        self._started = True
        self._bytes_on_disk = self._pool.apply(self._disk_usage)
        self._flusher = gevent.spawn(self._flush_loop)
        if self._replayed:
            self.reclaim()

    # -- the write path ------------------------------------------------------

    def append(self, entry: Entry) -> None:
        """Return once `entry` is fsynced; raise WalUnavailable if it could not be."""
        batch = self._enqueue(encode(records.ENTRY, records.encode_entry(entry)))
        batch.entries.append(entry.payload_id)
        self._wait(batch)

    def append_many(self, entries: Sequence[Entry]) -> None:
        """Make several entries durable with one wait: framed in one pass, written in one group commit."""
        if not entries:
            return
        batch = self._enqueue(encode_many(records.ENTRY, records.encode_entries(entries)))
        batch.entries.extend(entry.payload_id for entry in entries)
        self._wait(batch)

    def mark_delivered(self, payload_ids: Sequence[str]) -> None:
        """Record DELIVERED; does not wait, since a lost mark only means a harmless redelivery."""
        self._mark(records.DELIVERED, payload_ids)

    def mark_discarded(self, payload_ids: Sequence[str]) -> None:
        """Record DISCARDED for entries that must never be delivered (they lost an idempotency race)."""
        self._mark(records.DISCARDED, payload_ids)

    def mark_failed(self, payload_ids: Sequence[str]) -> None:
        """Record PERMANENT_FAILURE; the caller keeps the dead letter's data elsewhere first."""
        self._mark(records.FAILED, payload_ids)

    def flush(self) -> None:
        """Wait until everything handed to the WAL so far is durable."""
        batch = self._current
        if batch.chunks:
            self._wake.set()
            self._wait(batch)
        elif self._writing is not None:
            # Nothing queued, but the batch being written now was handed over before this call.
            self._wait(self._writing)

    def close(self) -> None:
        """Flush, stop the flusher and release the file and the thread. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join()
        self._pool.apply(self._close_fd)
        self._pool.kill()

    def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the WAL's I/O thread, so file work stays off the hub."""
        result: T = self._pool.apply(fn, args)
        return result

    def read_pending(self, destination: str, limit: int) -> list[Entry]:
        """Up to `limit` PENDING entries for `destination`, oldest first, read back from disk.

        For entries that are durable but no longer held in memory (a backlog that
        overflowed). Reads in the I/O thread; the set of pending ids is snapshotted
        here on the hub, so the thread never touches live state.
        """
        pending = frozenset(self._live.pending)
        numbers = list(self._segments)
        return self._pool.apply(_scan_pending, (self.directory, numbers, pending, destination, limit))

    # -- what operators and the service read --------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._live.pending)

    @property
    def size_bytes(self) -> int:
        return self._bytes_on_disk

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def is_pending(self, payload_id: str) -> bool:
        return payload_id in self._live.pending

    # -- internals: hub side -------------------------------------------------

    def _enqueue(self, frame: bytes) -> _Batch:
        if self._closing:
            raise WalUnavailable("the WAL is closed")
        batch = self._current
        batch.chunks.append(frame)
        self._wake.set()
        return batch

    def _mark(self, kind: int, payload_ids: Sequence[str]) -> None:
        if not payload_ids:
            return
        frame = encode(kind, records.encode_ids(payload_ids))
        batch = self._enqueue(frame)
        batch.marks.append(frame)
        batch.marked.append((mark_status(kind), list(payload_ids)))

    @staticmethod
    def _wait(batch: _Batch) -> None:
        batch.done.wait()
        if batch.error is not None:
            raise WalUnavailable(f"WAL write failed: {batch.error}") from batch.error

    def _flush_loop(self) -> None:
        while True:
            if not self._closing:
                # Once closing, nobody may set _wake again: keep draining until empty.
                self._wake.wait()
            self._wake.clear()
            batch = self._current
            if not batch.chunks:
                if self._closing:
                    return
                continue
            self._current = _Batch()
            self._writing = batch
            buf = b"".join(batch.chunks)
            try:
                seg = self._write_in_thread(buf)
            except OSError as exc:
                batch.error = exc
                self.last_error = exc
                self._log.error("wal_write_failed", directory=str(self.directory), error=str(exc), errno=exc.errno)
                self._carry_marks(batch)
            else:
                self.last_error = None
                self._bytes_on_disk += len(buf)
                self._account(seg, batch)
            self._writing = None
            batch.done.set()

    def _carry_marks(self, failed: _Batch) -> None:
        """Hand a failed batch's marks to the next batch, which writes them with the next append.

        Nobody waits for a mark, so dropping it would leave a delivered entry PENDING
        until a restart, and its segment unreclaimable. Writing a mark twice is
        harmless, and it still lands after its entry. At close they are given up:
        a retry loop on a dead disk would never end, and a lost mark only costs a
        redelivery, which stores nothing twice.
        """
        if not failed.marks or self._closing:
            return
        nxt = self._current
        nxt.chunks[:0] = failed.marks
        nxt.marks[:0] = failed.marks
        nxt.marked[:0] = failed.marked

    def _account(self, seg: int, batch: _Batch) -> None:
        # Rotation happens in the thread; learn of every segment it opened, even
        # ones a failed write left empty, so reclaim can delete them.
        last = self._segments[-1] if self._segments else seg - 1
        self._segments.extend(range(last + 1, seg + 1))
        live = self._live
        for payload_id in batch.entries:
            live.entry(payload_id, seg)
            self._seg_pending[seg] += 1
        for status, payload_ids in batch.marked:
            for payload_id in payload_ids:
                where = live.end(payload_id, status)
                if where is not None:
                    self._seg_pending[where] -= 1
        if batch.marked and len(self._segments) > 1 and self._replayed:
            self.reclaim()

    def reclaim(self) -> None:
        """Delete the oldest segments while every entry in them is marked (no longer PENDING).

        Only a prefix is deleted: a mark always lives in the same or a later
        segment than its entry, so deleting oldest-first never strands an entry
        whose mark was removed.
        """
        if not self._replayed:
            # Before replay, no segment's pending count is known yet.
            return
        doomed: list[int] = []
        for seg in self._segments[:-1]:
            if self._seg_pending.get(seg, 0) > 0:
                break
            doomed.append(seg)
        if not doomed:
            return
        try:
            freed: int = self._pool.apply(self._unlink, (doomed,))
        except OSError as exc:
            # Reclaim only frees space: it must never take the flusher down with it.
            # The segments stay listed, so the next mark tries again.
            self._log.error("wal_reclaim_failed", directory=str(self.directory), error=str(exc), errno=exc.errno)
            return
        del self._segments[: len(doomed)]
        for seg in doomed:
            self._seg_pending.pop(seg, None)
        self._bytes_on_disk = max(0, self._bytes_on_disk - freed)
        self._log.info("wal_segments_reclaimed", directory=str(self.directory), segments=len(doomed), bytes=freed)

    def _write_in_thread(self, buf: bytes) -> int:
        """_write in the I/O thread; its OSError is raised here, on the hub.

        Returned rather than raised in the thread: gevent's pool prints a traceback
        for every exception raised there, and a full disk fails every write.
        """
        seg, error = self._pool.apply(_returning_error, (self._write, buf))
        if error is not None:
            raise error
        return int(seg)

    # -- internals: I/O thread -----------------------------------------------

    def _open_segment(self, number: int) -> None:
        path = segment_path(self.directory, number)
        # O_DSYNC: each write returns once its bytes (and the file size) are on disk, the
        # same promise as write + fdatasync, in one syscall. The I/O thread gives up the
        # GIL around every syscall, and taking it back while the hub is busy can cost up
        # to the interpreter's switch interval (5 ms): one syscall a batch, not two.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_DSYNC
        fd = os.open(path, flags, 0o600)
        try:
            fsync_directory(self.directory)
        except OSError:
            # Remove the empty file we just made, or every retry's O_EXCL would fail.
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._seg, self._offset = fd, number, 0
        self._needs_rotation = False

    def _write(self, buf: bytes) -> int:
        if self._needs_rotation:
            self._open_segment(self._seg + 1)
        start = self._offset
        try:
            view = memoryview(buf)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # Cut the partial batch off so the file ends on a whole record, and move
            # to a fresh file: after a failed fsync the page cache cannot be trusted.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            self._needs_rotation = True
            raise
        seg = self._seg
        self._offset += len(buf)
        if self._offset >= self._segment_bytes:
            self._needs_rotation = True
        return seg

    def _unlink(self, numbers: list[int]) -> int:
        freed = 0
        for number in numbers:
            path = segment_path(self.directory, number)
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
        fsync_directory(self.directory)
        return freed

    def _disk_usage(self) -> int:
        return sum(path.stat().st_size for _n, path in list_segments(self.directory))

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _scan_pending(
    directory: Path, numbers: list[int], pending: frozenset[str], destination: str, limit: int
) -> list[Entry]:
    found: dict[str, Entry] = {}
    for number in numbers:
        for item in read_segment(segment_path(directory, number)):
            if not isinstance(item, Frame) or item.kind != records.ENTRY:
                continue
            try:
                entry = records.decode_entry(item.body)
            except (ValueError, KeyError, TypeError):
                continue
            if entry.payload_id in pending and entry.destination == destination:
                found[entry.payload_id] = entry
                if len(found) >= limit:
                    return list(found.values())
    return list(found.values())


def _returning_error(fn: Callable[[bytes], int], buf: bytes) -> tuple[int, OSError | None]:
    try:
        return fn(buf), None
    except OSError as exc:
        return -1, exc
