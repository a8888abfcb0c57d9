"""`wal inspect`: the entries of the WAL, filtered, one line each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from ..entry import Entry
from ._format import as_text, iso, write_json, write_row
from .wal_walk import DirectoryWalk, EntryInfo, Keep

ALL = "all"


@dataclass(frozen=True, slots=True)
class Listed:
    """One entry to print, with its final status and the WAL directory it is in."""

    wal_dir: str
    status: str
    info: EntryInfo


def entry_filter(*, source: str | None, destination: str | None, payload_id: str | None) -> Keep:
    """Keep entries matching every filter given; status is judged later, once the walk is done."""

    def keep(entry: Entry) -> bool:
        return (
            (source is None or entry.source == source)
            and (destination is None or entry.destination == destination)
            and (payload_id is None or entry.payload_id == payload_id)
        )

    return keep


def select(walks: list[DirectoryWalk], *, status: str, limit: int | None) -> Iterator[Listed]:
    """Kept entries of `status` (or every status), directory by directory in WAL order."""
    shown = 0
    for walk in walks:
        for payload_id, info in walk.entries.items():
            if limit is not None and shown >= limit:
                return
            final = walk.statuses.status(payload_id)
            if status in (ALL, final):
                shown += 1
                yield Listed(walk.directory.name, final, info)


def render(out: TextIO, listed: Iterator[Listed], *, as_json: bool, show_payload: bool) -> None:
    for item in listed:
        if as_json:
            write_json(out, _as_dict(item, show_payload=show_payload))
        else:
            write_row(out, _as_row(item, show_payload=show_payload))


def _as_dict(item: Listed, *, show_payload: bool) -> dict[str, object]:
    info = item.info
    row: dict[str, object] = {
        "payload_id": info.payload_id,
        "status": item.status,
        "source": info.source,
        "destination": info.destination,
        "subject": info.subject,
        "idempotency_key": info.idempotency_key,
        "received_at": iso(info.received_at),
        "payload_size": info.size,
        "wal_dir": item.wal_dir,
        "segment": info.segment,
        "offset": info.offset,
    }
    if show_payload and info.payload is not None:
        row["payload"] = as_text(info.payload)
    return row


def _as_row(item: Listed, *, show_payload: bool) -> list[str]:
    info = item.info
    fields = [
        info.payload_id,
        item.status,
        info.source,
        info.destination,
        info.subject if info.subject is not None else "-",
        iso(info.received_at),
        str(info.size),
    ]
    if show_payload and info.payload is not None:
        fields.append(as_text(info.payload))
    return fields
