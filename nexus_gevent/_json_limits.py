"""What a JSON body may hold to be stored and read back everywhere: nesting depth, and PostgreSQL's JSONB limits.

Checked at ingest, before the WAL: a 202 promises delivery, so what a destination can
never store is refused then, with 400 and the reason, rather than turned into a dead
letter after its attempts. Each check is cheap in the common case: a C-speed scan of
the bytes decides whether the exact (Python) walk is needed at all.
"""

from __future__ import annotations

import re

#: Deepest nesting of arrays and objects accepted. Real documents stay far below it;
#: SQLite's JSON functions stop at 1000 levels and orjson's encoder near 254, so 128
#: leaves every destination and every reader a wide margin.
MAX_NESTING = 128

#: PostgreSQL's numeric (which JSONB numbers are) keeps at most 16383 digits after the
#: decimal point; more is "value overflows numeric format" (SQLSTATE 22003). Its
#: limit before the point (131072 digits) is never reached: JSON parsing at ingest
#: already refuses a number beyond a double's range (about 1e308).
PG_MAX_SCALE = 16383

# A number can only break that limit with an exponent of five digits or a long run of
# digits: with |exponent| <= 9999 and fewer than 1000 fraction digits the scale stays
# far inside it.
_NUMBER_SUSPECT = re.compile(rb"[eE][+-]?\d{5}|\d{1000}")
# Strings are matched (and skipped) so that a number inside one is never read as a number.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?')
_NUL_ESCAPE = b"\\u0000"


def nesting_exceeds(body: bytes, value: object, limit: int = MAX_NESTING) -> bool:
    """True when arrays and objects in `value` (parsed from `body`) nest deeper than `limit`."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def jsonb_refusal(body: bytes, value: object) -> str | None:
    """Why PostgreSQL's JSONB cannot store this body, or None when it can."""
    if _NUL_ESCAPE in body and _holds_nul(value):
        return "a string holds \\u0000 (NUL), which PostgreSQL's JSONB cannot store"
    if _NUMBER_SUSPECT.search(body):
        for match in _TOKEN.finditer(body):
            integer, fraction, exponent = match.groups()
            if integer is None:
                continue  # a string
            reason = _numeric_refusal(fraction or b"", int(exponent or 0))
            if reason is not None:
                return reason
    return None


def _numeric_refusal(fraction: bytes, exponent: int) -> str | None:
    scale = max(0, len(fraction) - exponent)
    if scale > PG_MAX_SCALE:
        return f"a number has {scale} digits after the decimal point; PostgreSQL keeps at most {PG_MAX_SCALE}"
    return None


def _holds_nul(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
