"""Test doubles for the queue's ports, shipped with the package (like structlog.testing).

- ``RecordingDestination``: a Destination that records every write and can be told
  to reject entries, stall, or become unreachable.
- ``RecordingUpdater``: a WalUpdater that records what became of each entry.
- ``RecordingLogger``: a structlog-shaped logger that keeps its calls in a list.
- ``wait_until`` and ``make_entry``: small helpers for cooperative tests.

All of them run on gevent primitives, with or without monkey-patching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event

from .entry import Entry, new_payload_id
from .errors import DestinationUnavailable, EntryRejected

#: How often wait_until looks again: often enough that tests stay fast.
POLL_INTERVAL = 0.001
#: How long wait_until waits by default: far above any healthy wait in a test.
DEFAULT_WAIT = 5.0


def wait_until(predicate: Callable[[], object], timeout: float = DEFAULT_WAIT, what: str = "") -> None:
    """Yield to other greenlets until `predicate()` is true; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {what or predicate!r}")
        gevent.sleep(POLL_INTERVAL)


def make_entry(
    payload_id: str | None = None,
    *,
    payload: bytes = b'{"n": 1}',
    source: str = "test",
    destination: str = "recording",
) -> Entry:
    """An accepted write with a fresh payload id unless one is given."""
    return Entry(
        payload_id=payload_id or new_payload_id(),
        source=source,
        destination=destination,
        payload=payload,
        received_at=time.time(),
    )


# -- destination -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteCall:
    """One call of RecordingDestination.write: when it ended, with which ids, and how."""

    at: float
    payload_ids: tuple[str, ...]
    #: "ok", "rejected" (the batch itself was refused) or "unavailable".
    outcome: str


class RecordingDestination:
    """A Destination double. Every write is recorded; behaviour is set by commands.

    - ``fail(payload_id, times)``: a write holding that entry is rejected `times` times.
    - ``poison(*payload_ids)``: a write holding any of them is always rejected.
    - ``refuse_next(n)``: the next `n` writes raise DestinationUnavailable.
    - ``go_down()`` / ``come_back()``: writes and probes raise DestinationUnavailable
      until the destination comes back.
    - ``stall()`` / ``release()``: writes wait until released (a slow write).

    A rejected write stores nothing (one transaction), and consumes one failure of
    every counted entry it held.
    """

    def __init__(self, name: str = "recording", *, write_delay: float | None = None) -> None:
        self._name = name
        #: When set, each write first sleeps this long (0 only yields).
        self.write_delay = write_delay
        self.calls: list[WriteCall] = []
        self.probes = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False
        self.up = gevent.event.Event()
        self.up.set()
        self.gate = gevent.event.Event()
        self.gate.set()
        self._failures_left: dict[str, int] = {}
        self._poisoned: set[str] = set()
        self._unavailable_left = 0

    # -- commands --

    def fail(self, payload_id: str, times: int) -> None:
        self._failures_left[payload_id] = times

    def poison(self, *payload_ids: str) -> None:
        self._poisoned.update(payload_ids)

    def refuse_next(self, writes: int) -> None:
        self._unavailable_left = writes

    def go_down(self) -> None:
        self.up.clear()

    def come_back(self) -> None:
        self.up.set()

    def stall(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    # -- what happened --

    @property
    def batches(self) -> list[tuple[str, ...]]:
        """The ids of each write that stored its entries, in order."""
        return [c.payload_ids for c in self.calls if c.outcome == "ok"]

    @property
    def delivered(self) -> list[str]:
        """Every stored id, in the order stored (repeats would show up twice)."""
        return [pid for batch in self.batches for pid in batch]

    def calls_for(self, payload_id: str) -> list[WriteCall]:
        """Every write that held this entry, whatever its outcome."""
        return [c for c in self.calls if payload_id in c.payload_ids]

    # -- Destination --

    @property
    def name(self) -> str:
        return self._name

    def write(self, entries: Sequence[Entry]) -> None:
        ids = tuple(e.payload_id for e in entries)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.gate.wait()
            if self.write_delay is not None:
                gevent.sleep(self.write_delay)
            if not self.up.is_set() or self._unavailable_left > 0:
                self._unavailable_left = max(0, self._unavailable_left - 1)
                self.calls.append(WriteCall(time.monotonic(), ids, "unavailable"))
                raise DestinationUnavailable(f"{self._name}: connection refused")
            rejected = [pid for pid in ids if pid in self._poisoned or self._failures_left.get(pid, 0) > 0]
            for pid in rejected:
                if pid in self._failures_left:
                    self._failures_left[pid] -= 1
            if rejected:
                self.calls.append(WriteCall(time.monotonic(), ids, "rejected"))
                raise EntryRejected(f"{self._name}: rejected {rejected[0]}")
            self.calls.append(WriteCall(time.monotonic(), ids, "ok"))
        finally:
            self.in_flight -= 1

    def probe(self) -> None:
        self.probes += 1
        if not self.up.is_set():
            raise DestinationUnavailable(f"{self._name}: connection refused")

    def close(self) -> None:
        self.closed = True


# -- WAL updater -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliveredMark:
    """One call of RecordingUpdater.mark_delivered."""

    at: float
    payload_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FailureMark:
    """One call of RecordingUpdater.mark_permanent_failure: the entry, its last error and its attempts."""

    at: float
    entry: Entry
    error: str
    attempts: int


class RecordingUpdater:
    """A WalUpdater double that records marks; set `fail_*` to make marking raise.

    ``stall()`` / ``release()``: mark_delivered waits until released (a slow WAL).
    """

    def __init__(self) -> None:
        self.delivered_marks: list[DeliveredMark] = []
        self.failure_marks: list[FailureMark] = []
        self.fail_mark_delivered = False
        self.fail_mark_permanent_failure = False
        self.marking = 0
        self.gate = gevent.event.Event()
        self.gate.set()

    def stall(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def delivered_ids(self) -> list[str]:
        """Every id marked DELIVERED, in order (repeats would show up twice)."""
        return [pid for mark in self.delivered_marks for pid in mark.payload_ids]

    def mark_delivered(self, payload_ids: Sequence[str]) -> None:
        self.marking += 1
        try:
            self.gate.wait()
            if self.fail_mark_delivered:
                raise OSError("wal: no space left on device")
            self.delivered_marks.append(DeliveredMark(time.monotonic(), tuple(payload_ids)))
        finally:
            self.marking -= 1

    def mark_permanent_failure(self, entry: Entry, error: str, attempts: int) -> None:
        if self.fail_mark_permanent_failure:
            raise OSError("wal: no space left on device")
        self.failure_marks.append(FailureMark(time.monotonic(), entry, error, attempts))


# -- logger ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One logging call: the method's name, the event, and the bound and given fields."""

    level: str
    event: str
    fields: dict[str, Any]


class RecordingLogger:
    """A structlog-shaped logger; loggers made by `bind` share one list of records."""

    def __init__(self, records: list[LogRecord] | None = None, context: dict[str, Any] | None = None) -> None:
        self.records: list[LogRecord] = [] if records is None else records
        self._context: dict[str, Any] = dict(context or {})

    def bind(self, **fields: Any) -> RecordingLogger:
        return RecordingLogger(self.records, {**self._context, **fields})

    def at(self, level: str) -> list[LogRecord]:
        """The records logged through the method named `level`."""
        return [r for r in self.records if r.level == level]

    def events(self, level: str) -> list[str]:
        """The event names logged through the method named `level`."""
        return [r.event for r in self.at(level)]

    def _record(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.records.append(LogRecord(level, event, {**self._context, **fields}))

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._record("exception", event, fields)
