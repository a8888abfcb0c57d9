"""Segment files: names, listing, and reading one into records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ._frame import Damage, Frame, scan

SUFFIX = ".wal"
_PREFIX = "seg-"


def segment_path(directory: Path, number: int) -> Path:
    """The file of segment `number`; zero-padded so names sort like numbers."""
    return directory / f"{_PREFIX}{number:010d}{SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """Every segment in `directory`, oldest first."""
    found: list[tuple[int, Path]] = []
    for path in directory.glob(f"{_PREFIX}*{SUFFIX}"):
        digits = path.name[len(_PREFIX) : -len(SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def read_segment(path: Path) -> Iterator[Frame | Damage]:
    """The records and damaged runs of one segment. A vanished file reads as empty."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return iter(())
    return scan(data)
