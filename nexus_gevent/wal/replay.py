"""Replay: from the segments on disk to exactly the entries still PENDING."""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..entry import Entry
from . import records
from ._frame import Damage
from .segments import list_segments, read_segment


@dataclass(frozen=True, slots=True)
class DamageReport:
    """One damaged run, with where it is, for the ERROR log and `wal verify`."""

    path: Path
    offset: int
    length: int
    reason: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An idempotency key seen in the WAL, to rebuild the key index after a crash."""

    source: str
    key: str
    payload_id: str
    received_at: float


@dataclass
class ReplayResult:
    """What the WAL holds. `pending` keeps WAL order: oldest first."""

    pending: dict[str, tuple[Entry, int]] = field(default_factory=dict)
    keys: list[KeyRecord] = field(default_factory=list)
    damage: list[DamageReport] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    segments: list[int] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0


#: (records done, segments done, segments in all) -> None
Progress = Callable[[int, int, int], None]


def replay_directory(directory: Path, progress: Progress | None = None, *, below: int | None = None) -> ReplayResult:
    """Read every segment of `directory`, oldest first, and settle entries by their marks.

    Later records win, so an entry put back to PENDING (a retried dead letter) is
    pending again. Never raises on damage: each damaged run is reported and skipped.
    Segments numbered `below` and up are left out: they are being written now.
    """
    started = time.monotonic()
    result = ReplayResult()
    pending = result.pending
    segs = [(n, p) for n, p in list_segments(directory) if below is None or n < below]
    # Replay allocates a few objects per record and keeps most of them (the pending
    # entries), which sets off the cyclic collector over and over, each pass walking
    # the ever larger `pending`: a third or more of replay's time went there. Nothing
    # built here forms a cycle, so automatic collection is paused while reading and
    # restored after, if it was on (the switch is process-wide: cycles made meanwhile
    # by other threads or greenlets are only collected once it is back on).
    collecting = gc.isenabled()
    gc.disable()
    try:
        _read_segments(segs, result, progress)
    finally:
        if collecting:
            gc.enable()
    # Only pending entries' keys matter: a settled entry's key was claimed when it
    # was written, before its client got an answer.
    result.keys = [
        KeyRecord(e.source, e.idempotency_key, e.payload_id, e.received_at)
        for e, _n in pending.values()
        if e.idempotency_key is not None
    ]
    result.seconds = time.monotonic() - started
    return result


def _read_segments(segs: list[tuple[int, Path]], result: ReplayResult, progress: Progress | None) -> None:
    """The body of replay_directory: settle every record of `segs` into `result`."""
    pending = result.pending
    counts = result.counts
    decode_entry, decode_ids = records.decode_entry, records.decode_ids
    # The loop body is inlined on purpose: it runs once per record at startup.
    for done, (number, path) in enumerate(segs):
        result.segments.append(number)
        entries = 0
        for item in read_segment(path):
            if type(item) is Damage:
                result.damage.append(DamageReport(path, item.offset, item.length, item.reason))
                continue
            kind, body = item.kind, item.body  # type: ignore[union-attr]
            try:
                if kind == records.ENTRY:
                    entry = decode_entry(body)
                    # Re-insert so a revived entry takes its new place in WAL order.
                    if pending.pop(entry.payload_id, None) is not None:
                        counts["revived"] += 1
                    pending[entry.payload_id] = (entry, number)
                    entries += 1
                elif kind in records.SETTLING_KINDS:
                    ids = decode_ids(body)
                    for settled in ids:
                        pending.pop(settled, None)
                    counts[records.KIND_NAMES[kind]] += len(ids)
                else:
                    raise ValueError(f"unknown record kind {kind}")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                # An intact frame whose body we cannot read: skip it like damage.
                result.damage.append(DamageReport(path, item.offset, len(body), f"undecodable: {exc}"))
                continue
            result.records += 1
        if entries:
            counts["entry"] += entries
        if progress is not None:
            progress(result.records, done + 1, len(segs))
