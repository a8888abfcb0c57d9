"""Output helpers shared by the commands: timestamps, one-line text, JSON lines."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TextIO

#: C0 control characters (and DEL) shown escaped, so one record stays on one line and
#: tabs separate fields only. Backslashes stay as they are: JSON text is full of them,
#: and --json is the exact form.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def iso(timestamp: float) -> str:
    """A Unix timestamp as ISO 8601 in UTC, to the millisecond."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="milliseconds")


def one_line(text: str) -> str:
    """`text` with newlines, tabs and other control characters escaped."""
    return text.translate(_ESCAPES)


def as_text(data: bytes) -> str:
    """Bytes as text for display: UTF-8, undecodable bytes replaced."""
    return data.decode("utf-8", errors="replace")


def write_json(out: TextIO, value: object) -> None:
    """One JSON document on one line."""
    out.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")


def write_row(out: TextIO, fields: list[str]) -> None:
    """One tab-separated line; each field is made single-line first."""
    out.write("\t".join(one_line(f) for f in fields) + "\n")
