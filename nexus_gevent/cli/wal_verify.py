"""`wal verify`: an integrity report per WAL directory, and the exit code it implies."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from ..wal.fold import STATUSES
from ._format import write_json
from .wal_walk import DamagedRun, DirectoryWalk

EXIT_HEALTHY = 0
EXIT_DAMAGED = 1


def counted_damage(walk: DirectoryWalk, *, allow_torn_tail: bool) -> list[DamagedRun]:
    """The damaged runs that make a directory unhealthy."""
    return [run for run in walk.damage if not (allow_torn_tail and run.torn_tail)]


def exit_code(walks: list[DirectoryWalk], *, allow_torn_tail: bool) -> int:
    damaged = any(counted_damage(w, allow_torn_tail=allow_torn_tail) for w in walks)
    return EXIT_DAMAGED if damaged else EXIT_HEALTHY


def directory_report(walk: DirectoryWalk, *, locked: bool) -> dict[str, object]:
    """Everything verify knows about one directory, as JSON-ready values."""
    counts = walk.status_counts()
    return {
        "directory": str(walk.directory),
        "locked": locked,
        "segments": len(walk.segments),
        "records": walk.records,
        "bytes": sum(s.size for s in walk.segments),
        "entries": {"total": len(walk.statuses), **counts},
        "unmatched_marks": walk.unmatched_marks,
        "damaged_runs": len(walk.damage),
        "damaged_bytes": sum(run.length for run in walk.damage),
        "damage": [
            {
                "file": str(run.path),
                "offset": run.offset,
                "length": run.length,
                "reason": run.reason,
                "torn_tail": run.torn_tail,
            }
            for run in walk.damage
        ],
        "segment_files": [
            {
                "number": s.number,
                "file": str(s.path),
                "bytes": s.size,
                "records": s.records,
                "damaged_runs": s.damaged_runs,
            }
            for s in walk.segments
        ],
    }


def render_json(out: TextIO, data_dir: Path, walks: list[DirectoryWalk], locked: frozenset[Path], code: int) -> None:
    reports = [directory_report(w, locked=w.directory in locked) for w in walks]
    write_json(
        out,
        {
            "data_dir": str(data_dir),
            "status": "healthy" if code == EXIT_HEALTHY else "damaged",
            "exit_code": code,
            "directories": reports,
            "totals": _totals(walks),
        },
    )


def render_text(out: TextIO, data_dir: Path, walks: list[DirectoryWalk], locked: frozenset[Path], code: int) -> None:
    out.write(f"data dir {data_dir}: {len(walks)} WAL directories\n")
    for walk in walks:
        _directory_text(out, walk, locked=walk.directory in locked)
    totals = _totals(walks)
    out.write(
        f"total: {totals['segments']} segments, {totals['records']} records, {totals['bytes']} bytes, "
        f"{totals['entries']} entries ({totals['pending']} pending), {totals['damaged_runs']} damaged runs\n"
    )
    out.write("result: healthy\n" if code == EXIT_HEALTHY else "result: DAMAGED\n")


def _directory_text(out: TextIO, walk: DirectoryWalk, *, locked: bool) -> None:
    counts = walk.status_counts()
    out.write(f"{walk.directory.name}: {walk.directory}\n")
    if locked:
        out.write("  LOCKED by a running service, read anyway (--force): the newest segment may be mid-write\n")
    size = sum(s.size for s in walk.segments)
    out.write(f"  segments {len(walk.segments)}, records {walk.records}, bytes {size}\n")
    by_status = ", ".join(f"{status} {counts[status]}" for status in STATUSES)
    out.write(f"  entries {len(walk.statuses)}: {by_status}; marks without entry {walk.unmatched_marks}\n")
    if not walk.damage:
        out.write("  damaged runs 0\n")
        return
    out.write(f"  damaged runs {len(walk.damage)} ({sum(r.length for r in walk.damage)} bytes):\n")
    for run in walk.damage:
        tail = " [torn tail]" if run.torn_tail else ""
        out.write(f"    {run.path} offset {run.offset} length {run.length}: {run.reason}{tail}\n")


def _totals(walks: list[DirectoryWalk]) -> dict[str, int]:
    totals = {
        "directories": len(walks),
        "segments": sum(len(w.segments) for w in walks),
        "records": sum(w.records for w in walks),
        "bytes": sum(s.size for w in walks for s in w.segments),
        "entries": sum(len(w.statuses) for w in walks),
        "damaged_runs": sum(len(w.damage) for w in walks),
    }
    counts = [w.status_counts() for w in walks]
    for status in STATUSES:
        totals[status] = sum(c[status] for c in counts)
    return totals
