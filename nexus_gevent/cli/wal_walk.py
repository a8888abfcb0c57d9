"""One read-only pass over a WAL directory: each entry's final status, and every damaged run.

It settles entries exactly as wal.replay.replay_directory does (later records win, so
a retried dead letter's new entry record makes it pending again; a frame that is
intact but cannot be decoded counts as damage), but keeps what replay drops: the
status of settled entries, per-segment figures, and where each damaged run ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..entry import Entry
from ..wal import records
from ..wal._frame import HEADER_SIZE, Damage, Frame, scan
from ..wal.segments import list_segments

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
DISCARDED = "discarded"
STATUSES = (PENDING, DELIVERED, FAILED, DISCARDED)
_MARK_STATUS = {records.DELIVERED: DELIVERED, records.FAILED: FAILED, records.DISCARDED: DISCARDED}

#: Damage that ends a segment file this way is what a crash mid-write leaves.
_TORN_REASONS = frozenset(("torn header", "torn record"))
#: Intact records between two progress reports inside one segment.
_PROGRESS_EVERY = 4096

#: Which entries to keep the metadata of (statuses are kept for all).
Keep = Callable[[Entry], bool]
#: Progress: (records done since the last call, segments finished since the last call).
Advance = Callable[[int, int], None]


def keep_nothing(_entry: Entry) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """An entry's metadata and where its latest entry record is; the payload only if asked for."""

    payload_id: str
    source: str
    destination: str
    subject: str | None
    idempotency_key: str | None
    received_at: float
    size: int
    segment: int
    offset: int
    payload: bytes | None


@dataclass(frozen=True, slots=True)
class DamagedRun:
    """Bytes of a segment that hold no readable record."""

    path: Path
    offset: int
    length: int
    reason: str
    #: A torn record or header running to the end of its file: a crash mid-write.
    torn_tail: bool


@dataclass(frozen=True, slots=True)
class SegmentStats:
    number: int
    path: Path
    size: int
    records: int
    damaged_runs: int


@dataclass
class DirectoryWalk:
    """What one WAL directory holds. `statuses` and `entries` keep WAL order."""

    directory: Path
    statuses: dict[str, str] = field(default_factory=dict)
    entries: dict[str, EntryInfo] = field(default_factory=dict)
    segments: list[SegmentStats] = field(default_factory=list)
    damage: list[DamagedRun] = field(default_factory=list)
    records: int = 0
    #: Ids settled by a mark whose entry record is gone (its segment was reclaimed).
    unmatched_marks: int = 0

    def status_counts(self) -> dict[str, int]:
        counted = Counter(self.statuses.values())
        return {status: counted[status] for status in STATUSES}


def walk_directory(
    directory: Path, *, keep: Keep = keep_nothing, with_payload: bool = False, advance: Advance | None = None
) -> DirectoryWalk:
    """Read every segment of `directory`, oldest first. Never raises on damage."""
    walk = DirectoryWalk(directory)
    for number, path in list_segments(directory):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # reclaimed since listed: only with --force on a live directory
            if advance is not None:
                advance(0, 1)
            continue
        _walk_segment(walk, number, path, data, keep=keep, with_payload=with_payload, advance=advance)
    return walk


def _walk_segment(
    walk: DirectoryWalk,
    number: int,
    path: Path,
    data: bytes,
    *,
    keep: Keep,
    with_payload: bool,
    advance: Advance | None,
) -> None:
    intact = runs = unreported = 0
    for item in scan(data):
        if isinstance(item, Damage):
            torn = item.reason in _TORN_REASONS and item.offset + item.length == len(data)
            walk.damage.append(DamagedRun(path, item.offset, item.length, item.reason, torn))
            runs += 1
            continue
        try:
            _apply(walk, number, item, keep, with_payload)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            length = HEADER_SIZE + len(item.body)
            walk.damage.append(DamagedRun(path, item.offset, length, f"undecodable: {exc}", False))
            runs += 1
            continue
        intact += 1
        unreported += 1
        if advance is not None and unreported >= _PROGRESS_EVERY:
            advance(unreported, 0)
            unreported = 0
    walk.records += intact
    walk.segments.append(SegmentStats(number, path, len(data), intact, runs))
    if advance is not None:
        advance(unreported, 1)


def _apply(walk: DirectoryWalk, segment: int, frame: Frame, keep: Keep, with_payload: bool) -> None:
    if frame.kind == records.ENTRY:
        entry = records.decode_entry(frame.body)
        payload_id = entry.payload_id
        # Re-insert, so a revived entry takes its new place in WAL order (as replay does).
        walk.statuses.pop(payload_id, None)
        walk.statuses[payload_id] = PENDING
        walk.entries.pop(payload_id, None)
        if keep(entry):
            walk.entries[payload_id] = _info(entry, segment, frame.offset, with_payload)
        return
    status = _MARK_STATUS.get(frame.kind)
    if status is None:
        raise ValueError(f"unknown record kind {frame.kind}")
    for payload_id in records.decode_ids(frame.body):
        if payload_id in walk.statuses:
            walk.statuses[payload_id] = status
        else:
            walk.unmatched_marks += 1


def _info(entry: Entry, segment: int, offset: int, with_payload: bool) -> EntryInfo:
    return EntryInfo(
        payload_id=entry.payload_id,
        source=entry.source,
        destination=entry.destination,
        subject=entry.subject,
        idempotency_key=entry.idempotency_key,
        received_at=entry.received_at,
        size=len(entry.payload),
        segment=segment,
        offset=offset,
        payload=entry.payload if with_payload else None,
    )
