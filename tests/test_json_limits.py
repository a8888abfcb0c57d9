"""What a body may hold: nesting depth for every destination, and JSONB's limits for PostgreSQL."""

from __future__ import annotations

import orjson
import psycopg
import pytest

from nexus_gevent._json_limits import MAX_NESTING, jsonb_refusal, nesting_exceeds

pytest_plugins = ["tests.support.postgres"]


def nested(depth: int) -> bytes:
    """An object whose value holds arrays nested so that the whole body is `depth` levels deep."""
    return b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


#: Bodies orjson accepts, and whether PostgreSQL's JSONB stores them (checked against the real server below).
JSONB_CASES = {
    "scale-16383": (b'{"a": 1e-16383}', True),
    "scale-16384": (b'{"a": 1e-16384}', False),
    "scale-20000": (b'{"a": 1e-20000}', False),
    "fraction-and-exponent-16384": (b'{"a": 1.5e-16383}', False),
    "zero-with-a-huge-scale": (b'{"a": 0e-99999}', False),
    "zero-with-a-huge-exponent": (b'{"a": 0e99999}', True),
    "small-exponent": (b'{"a": 1e-999}', True),
    "nul-in-a-value": (b'{"a": "x\\u0000y"}', False),
    "nul-as-a-key": (b'{"\\u0000": 1}', False),
    "escaped-backslash-then-u0000": (b'{"a": "\\\\u0000"}', True),
    "exponent-inside-a-string": (b'{"a": "1e-99999"}', True),
    "exponent-after-an-escaped-quote": (b'{"a": "\\"1e-99999"}', True),
    "big-integer": (b'{"id": 18446744073709551617}', True),
}


class TestNesting:
    """Arrays and objects nest at most MAX_NESTING levels deep."""

    def test_the_limit_itself_is_accepted(self) -> None:
        """A body exactly MAX_NESTING levels deep is within the limit."""
        body = nested(MAX_NESTING)
        assert not nesting_exceeds(body, orjson.loads(body))

    def test_one_level_past_the_limit_is_refused(self) -> None:
        """A body MAX_NESTING + 1 levels deep exceeds it."""
        body = nested(MAX_NESTING + 1)
        assert nesting_exceeds(body, orjson.loads(body))

    def test_many_brackets_side_by_side_are_not_depth(self) -> None:
        """A thousand sibling arrays (brackets, but one level each) are within the limit."""
        body = b'{"a": [' + b",".join([b"[]"] * 1000) + b"]}"
        assert not nesting_exceeds(body, orjson.loads(body))

    def test_brackets_inside_strings_are_not_depth(self) -> None:
        """Brackets in a string value do not count as nesting."""
        body = b'{"a": "' + b"[" * 500 + b'"}'
        assert not nesting_exceeds(body, orjson.loads(body))


class TestJsonbRefusal:
    """The ingest check for PostgreSQL refuses exactly what JSONB refuses."""

    @pytest.mark.parametrize(("body", "storable"), JSONB_CASES.values(), ids=JSONB_CASES.keys())
    def test_the_verdict_is_the_expected_one(self, body: bytes, storable: bool) -> None:
        """Each case is refused, with a reason, exactly when JSONB cannot hold it."""
        reason = jsonb_refusal(body, orjson.loads(body))
        assert (reason is None) == storable, reason

    @pytest.mark.postgres
    @pytest.mark.parametrize(("body", "storable"), JSONB_CASES.values(), ids=JSONB_CASES.keys())
    def test_postgresql_agrees(self, postgres_url: str, body: bytes, storable: bool) -> None:
        """The real server stores every case the check lets through and refuses every case it refuses."""
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            try:
                conn.execute("SELECT %s::jsonb", (body.decode(),))
            except psycopg.errors.DataError:
                stored = False
            else:
                stored = True
        assert stored == storable
