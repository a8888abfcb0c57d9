"""Replay: from the segments on disk to exactly the entries still PENDING."""

from __future__ import annotations

import gc
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..entry import Entry
from . import records
from ._frame import CHECKED_FROM, HEADER_SIZE, KIND_AT, MAGIC, MAX_BODY, Damage, Frame, scan, unpack_header
from .fold import Fold
from .segments import list_segments


@dataclass(frozen=True, slots=True)
class DamageReport:
    """One damaged run, with where it is, for the ERROR log and `wal verify`."""

    path: Path
    offset: int
    length: int
    reason: str


@dataclass
class ReplayResult:
    """What the WAL holds. `pending` keeps WAL order: oldest first."""

    pending: dict[str, tuple[Entry, int]] = field(default_factory=dict)
    damage: list[DamageReport] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    segments: list[int] = field(default_factory=list)
    records: int = 0
    seconds: float = 0.0


#: What decoding a damaged (but checksummed) body can raise.
_UNDECODABLE = (ValueError, KeyError, TypeError, UnicodeDecodeError)

#: (records done, segments done, segments in all) -> None
Progress = Callable[[int, int, int], None]


def replay_directory(directory: Path, progress: Progress | None = None, *, below: int | None = None) -> ReplayResult:
    """Read every segment of `directory`, oldest first, and fold its records into the PENDING entries.

    The rules are wal.fold's: later records win, so an entry put back to PENDING (a
    retried dead letter) is pending again. Never raises on damage: each damaged run
    is reported and skipped. Segments numbered `below` and up are left out: they are being written now.
    """
    started = time.monotonic()
    fold: Fold[tuple[Entry, int]] = Fold()
    result = ReplayResult(pending=fold.pending)
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
        _read_segments(segs, result, fold, progress)
    finally:
        if collecting:
            gc.enable()
    result.seconds = time.monotonic() - started
    return result


def _read_segments(
    segs: list[tuple[int, Path]], result: ReplayResult, fold: Fold[tuple[Entry, int]], progress: Progress | None
) -> None:
    """The body of replay_directory: fold every record of `segs` into `result`."""
    for done, (number, path) in enumerate(segs):
        result.segments.append(number)
        try:
            buf = path.read_bytes()
        except FileNotFoundError:
            buf = b""
        pos = _fold_intact(buf, number, path, result, fold)
        if pos < len(buf):
            # Damage: the general scanner finds and reports each damaged run and goes
            # on with the intact records after it. Rare, so its cost per record is moot.
            for item in scan(buf, pos):
                if type(item) is Damage:
                    result.damage.append(DamageReport(path, item.offset, item.length, item.reason))
                else:
                    _fold_record(item, number, path, result, fold)  # type: ignore[arg-type]
        if progress is not None:
            progress(result.records, done + 1, len(segs))


def _fold_intact(buf: bytes, number: int, path: Path, result: ReplayResult, fold: Fold[tuple[Entry, int]]) -> int:
    """Fold the intact records at the start of `buf`; returns where the first damage begins.

    The fast path of replay, and the reason it is written out by hand: it runs once
    per record at startup. It checks each frame where it lies and decodes an entry
    straight from the segment's bytes, with no Frame, no generator and no copy of the
    record's body (replay went from about 8 to 6 us a record). For the same reason
    it applies an entry record inline, as Fold.entry does (same rule, no call per
    record). Anything but an intact entry record goes through _fold_record, as the
    slow path's records do.
    """
    pending = fold.pending
    pop = pending.pop
    unpack, crc32, decode = unpack_header, zlib.crc32, records.decode_entry_at
    entry_kind = records.ENTRY
    view = memoryview(buf)
    pos, end = 0, len(buf)
    entries = revived = 0
    while pos + HEADER_SIZE <= end:
        magic, crc, length = unpack(buf, pos)
        start = pos + HEADER_SIZE
        stop = start + length
        if magic != MAGIC or length > MAX_BODY or stop > end or crc32(view[pos + CHECKED_FROM : stop]) != crc:
            break
        if buf[pos + KIND_AT] == entry_kind:
            try:
                entry = decode(buf, view, start, stop)
                payload_id = entry[0]
                # Inside the try: an id that is not a string (unhashable) is damage too.
                previous = pop(payload_id, None)
            except _UNDECODABLE as exc:
                result.damage.append(DamageReport(path, pos, length, f"undecodable: {exc}"))
                pos = stop
                continue
            # Re-inserted, so that a revived entry takes its new place in WAL order.
            if previous is not None:
                revived += 1
            pending[payload_id] = (entry, number)
            entries += 1
        else:
            _fold_record(Frame(pos, buf[pos + KIND_AT], buf[start:stop]), number, path, result, fold)
        pos = stop
    result.records += entries
    if entries:
        result.counts["entry"] += entries
    if revived:
        result.counts["revived"] += revived
    return pos


def _fold_record(frame: Frame, number: int, path: Path, result: ReplayResult, fold: Fold[tuple[Entry, int]]) -> None:
    """Fold one intact record into `result`; an unreadable body is reported as damage."""
    kind, body = frame.kind, frame.body
    try:
        if kind == records.ENTRY:
            entry = records.decode_entry(body)
            if fold.entry(entry.payload_id, (entry, number)):
                result.counts["revived"] += 1
            result.counts["entry"] += 1
        else:
            marked = fold.mark(kind, body)
            result.counts[records.KIND_NAMES[kind]] += marked
    except _UNDECODABLE as exc:
        # An intact frame whose body we cannot read: skip it like damage.
        result.damage.append(DamageReport(path, frame.offset, len(body), f"undecodable: {exc}"))
        return
    result.records += 1
