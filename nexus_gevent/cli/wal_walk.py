"""One read-only pass over a WAL directory: each entry's final status, and every damaged run.

Statuses come from wal.fold, the fold replay uses (later records win, so a retried
dead letter's new entry record makes it pending again; a frame that is intact but
cannot be decoded counts as damage). Unlike replay it keeps the status of entries a
mark ended, per-segment figures, and where each damaged run ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..entry import Entry
from ..wal import records
from ..wal._frame import HEADER_SIZE, Damage, Frame, scan
from ..wal.fold import Fold
from ..wal.segments import list_segments

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
    """What one WAL directory holds. `entries` keeps WAL order; `statuses` has every entry's, by id."""

    directory: Path
    #: Each entry's status, by id, with the segment of its latest entry record while pending.
    statuses: Fold[int] = field(default_factory=lambda: Fold(keep_ended=True))
    entries: dict[str, EntryInfo] = field(default_factory=dict)
    segments: list[SegmentStats] = field(default_factory=list)
    damage: list[DamagedRun] = field(default_factory=list)
    records: int = 0

    @property
    def unmatched_marks(self) -> int:
        """Ids named by a mark whose entry record is gone (its segment was reclaimed)."""
        return self.statuses.unmatched

    def status_counts(self) -> dict[str, int]:
        return self.statuses.counts()


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
    if frame.kind != records.ENTRY:
        walk.statuses.mark(frame.kind, frame.body)
        return
    entry = records.decode_entry(frame.body)
    payload_id = entry.payload_id
    walk.statuses.entry(payload_id, segment)
    # Re-inserted, so a revived entry takes its new place in WAL order, as in the fold.
    walk.entries.pop(payload_id, None)
    if keep(entry):
        walk.entries[payload_id] = _info(entry, segment, frame.offset, with_payload)


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
