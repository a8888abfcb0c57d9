"""The PostgreSQL destination, against a real server (see tests/support/postgres.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import psycopg_pool
import pytest

from nexus_gevent.destinations import open_destination
from nexus_gevent.destinations._sql import format_timestamp
from nexus_gevent.destinations.postgres import (
    _WRITE_LOCK_KEY,
    SCHEMA_VERSION,
    PostgresDestination,
    classify_pg_error,
)
from nexus_gevent.errors import ConfigError, DestinationUnavailable, EntryRejected
from tests.support.destinations import DEST, RECORD_KEYS, TIMESTAMP, numbered_entry, page_through

if TYPE_CHECKING:
    from tests.support.postgres import PostgresServer

# The fixtures (postgres_server, postgres_db_url, managed_postgres, dead_postgres_url) come
# from there; it is only loaded as a plugin, so that pytest rewrites its asserts.
pytest_plugins = ["tests.support.postgres"]

ROOT = Path(__file__).resolve().parent.parent
#: A JSON text that is valid JSON but cannot be stored as jsonb (SQLSTATE 22P05).
NUL_ESCAPE_PAYLOAD = b'{"a":"x\\u0000y"}'
#: Long enough for a pooled connection to come back after a restart, far above the few
#: seconds that takes.
RECOVERY_DEADLINE = 30.0
#: Received times with microseconds, to see that timestamptz keeps them.
RECEIVED_WITH_MICROSECONDS = 1_700_000_000.123456


@pytest.fixture
def dest(postgres_db_url: str) -> Iterator[PostgresDestination]:
    d = PostgresDestination(DEST, postgres_db_url, connect_timeout=2.0)
    yield d
    d.close()


def fetch(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one query on a plain connection of the test's own, as another program would."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def sql_error(url: str, *statements: str) -> psycopg.Error:
    """The error the server raises for the last of `statements`."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements[:-1]:
            conn.execute(statement.encode())
        try:
            conn.execute(statements[-1].encode())
        except psycopg.Error as exc:
            return exc
    raise AssertionError(f"no error from {statements[-1]!r}")


def wait_for_probe(d: PostgresDestination) -> None:
    """Probe until the destination answers, as the queue's prober does."""
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while True:
        try:
            d.probe()
            return
        except DestinationUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.postgres
class TestSchema:
    def test_first_use_creates_the_table_with_the_contract_columns(
        self, dest: PostgresDestination, postgres_db_url: str
    ) -> None:
        """The first probe creates nexus_entries with the contract's columns, JSONB payload and text key."""
        dest.probe()
        columns = dict(
            fetch(
                postgres_db_url,
                """
            SELECT column_name, data_type FROM information_schema.columns
            WHERE table_name = 'nexus_entries'
        """,
            )
        )
        assert columns == {
            "payload_id": "text",
            "seq": "bigint",
            "source": "text",
            "destination": "text",
            "subject": "text",
            "idempotency_key": "text",
            "received_at": "timestamp with time zone",
            "delivered_at": "timestamp with time zone",
            "payload": "jsonb",
        }
        key = fetch(
            postgres_db_url,
            """
            SELECT a.attname FROM pg_index i
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
            WHERE i.indrelid = 'nexus_entries'::regclass AND i.indisprimary
        """,
        )
        assert key == [("payload_id",)]

    def test_paging_and_filter_indexes_exist(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """seq has a unique index, and (source, seq) and (subject, seq) are indexed for /query."""
        dest.probe()
        indexes = {
            row[0]
            for row in fetch(
                postgres_db_url,
                """
            SELECT indexdef FROM pg_indexes WHERE tablename = 'nexus_entries'
        """,
            )
        }
        assert any("UNIQUE" in d and "(seq)" in d for d in indexes)
        assert any("(source, seq)" in d for d in indexes)
        assert any("(subject, seq)" in d for d in indexes)

    def test_schema_version_is_recorded(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """Each applied migration leaves one row in nexus_schema_version."""
        dest.probe()
        versions = fetch(postgres_db_url, "SELECT version FROM nexus_schema_version ORDER BY version")
        assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]

    def test_opening_again_keeps_schema_and_rows(self, postgres_db_url: str) -> None:
        """A second destination on a migrated database migrates nothing and sees the rows."""
        first = PostgresDestination(DEST, postgres_db_url)
        try:
            first.write([numbered_entry(1)])
        finally:
            first.close()
        second = PostgresDestination(DEST, postgres_db_url)
        try:
            second.probe()
            assert second.count() == 1
        finally:
            second.close()
        assert fetch(postgres_db_url, "SELECT count(*) FROM nexus_schema_version") == [(SCHEMA_VERSION,)]

    def test_concurrent_first_uses_migrate_once(self, postgres_db_url: str) -> None:
        """Several destinations starting at once on an empty database all succeed and migrate once."""
        dests = [PostgresDestination(DEST, postgres_db_url) for _ in range(6)]
        try:
            with ThreadPoolExecutor(len(dests)) as pool:
                list(pool.map(lambda d: d.write([numbered_entry(1)]), dests))
        finally:
            for d in dests:
                d.close()
        assert fetch(postgres_db_url, "SELECT count(*) FROM nexus_schema_version") == [(SCHEMA_VERSION,)]
        assert fetch(postgres_db_url, "SELECT count(*) FROM nexus_entries") == [(1,)]

    def test_newer_schema_reads_as_unavailable(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """A database migrated by newer code is not written to, and no entry is blamed for it."""
        dest.probe()
        fetch(
            postgres_db_url,
            "INSERT INTO nexus_schema_version (version) VALUES (%s) RETURNING version",
            (SCHEMA_VERSION + 1,),
        )
        newer = PostgresDestination(DEST, postgres_db_url)
        try:
            with pytest.raises(DestinationUnavailable, match="newer"):
                newer.write([numbered_entry(1)])
        finally:
            newer.close()


@pytest.mark.postgres
class TestWrite:
    def test_batch_is_stored_with_every_field(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """Each entry becomes one row: its ids, this destination's name, its times in UTC and its payload."""
        entries = [
            numbered_entry(1, subject="s", received_base=RECEIVED_WITH_MICROSECONDS),
            numbered_entry(2, received_base=RECEIVED_WITH_MICROSECONDS),
        ]
        before = time.time()
        dest.write(entries)
        rows = fetch(
            postgres_db_url,
            """
            SELECT payload_id, source, destination, subject, idempotency_key,
                   extract(epoch FROM received_at), extract(epoch FROM delivered_at), payload
            FROM nexus_entries ORDER BY seq
        """,
        )
        assert [r[:5] for r in rows] == [
            (f"{1:032x}", "default", DEST, "s", "key-1"),
            (f"{2:032x}", "default", DEST, None, "key-2"),
        ]
        assert [float(str(r[5])) for r in rows] == pytest.approx([e.received_at for e in entries], abs=1e-6)
        assert all(before - 1 <= float(str(r[6])) <= time.time() + 1 for r in rows)
        assert [r[7] for r in rows] == [{"n": 1}, {"n": 2}]

    def test_same_payload_id_twice_leaves_one_row(self, dest: PostgresDestination) -> None:
        """Writing a payload_id again, in a later batch or the same one, stores it once."""
        dest.write([numbered_entry(1)])
        dest.write([numbered_entry(1), numbered_entry(2), numbered_entry(2)])
        assert dest.count() == 2

    def test_redelivery_keeps_the_first_row(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """A redelivered payload_id does not overwrite what was stored first."""
        dest.write([numbered_entry(1, payload=b'{"v":"first"}')])
        dest.write([numbered_entry(1, payload=b'{"v":"second"}')])
        assert fetch(postgres_db_url, "SELECT payload->>'v' FROM nexus_entries") == [("first",)]

    def test_empty_batch_touches_nothing(self, dead_postgres_url: str) -> None:
        """An empty batch returns at once, even with no server to talk to."""
        d = PostgresDestination(DEST, dead_postgres_url)
        try:
            d.write([])
        finally:
            d.close()

    def test_nul_escape_in_a_json_string_is_rejected(self, dest: PostgresDestination) -> None:
        """A "\\u0000" in a JSON string cannot be stored in JSONB: the entry is rejected, not the server."""
        with pytest.raises(EntryRejected, match="22P05"):
            dest.write([numbered_entry(1, payload=NUL_ESCAPE_PAYLOAD)])

    def test_one_bad_entry_fails_its_whole_batch(self, dest: PostgresDestination) -> None:
        """The batch is one transaction: a rejected entry stores none of its healthy neighbours."""
        batch = [numbered_entry(1), numbered_entry(2, payload=NUL_ESCAPE_PAYLOAD), numbered_entry(3)]
        with pytest.raises(EntryRejected):
            dest.write(batch)
        assert dest.count() == 0
        dest.write([batch[0], batch[2]])
        assert dest.count() == 2

    @pytest.mark.parametrize(
        ("payload", "reason"),
        [(b"[1, 2]", "23514"), (b'{"a":', "22P02"), (b'{"a":"\xff"}', "UTF-8")],
        ids=["not-an-object", "malformed-json", "invalid-utf8"],
    )
    def test_payloads_the_table_cannot_hold_are_rejected(
        self, dest: PostgresDestination, payload: bytes, reason: str
    ) -> None:
        """A payload that is not a JSON object, not JSON, or not UTF-8 is the entry's fault."""
        with pytest.raises(EntryRejected, match=reason):
            dest.write([numbered_entry(1, payload=payload)])

    def test_nul_byte_in_a_text_field_is_rejected(self, dest: PostgresDestination) -> None:
        """A NUL character in the subject, refused by the driver before sending, is the entry's fault."""
        with pytest.raises(EntryRejected):
            dest.write([numbered_entry(1, subject="a\x00b")])

    def test_subject_too_large_for_its_index_is_rejected(self, dest: PostgresDestination) -> None:
        """A subject too large for a btree index (SQLSTATE 54000) is the entry's fault."""
        huge = os.urandom(8000).hex()
        with pytest.raises(EntryRejected, match="54000"):
            dest.write([numbered_entry(1, subject=huge)])

    def test_writers_take_turns_so_seq_follows_commit_order(
        self, dest: PostgresDestination, postgres_db_url: str
    ) -> None:
        """A write waits while another transaction holds the write lock, so no later commit gets a smaller seq."""
        dest.probe()
        done = threading.Event()
        with psycopg.connect(postgres_db_url, autocommit=True) as other, other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))

            def write() -> None:
                dest.write([numbered_entry(1)])
                done.set()

            writer = threading.Thread(target=write)
            writer.start()
            assert not done.wait(0.5)
        writer.join(10)
        assert done.is_set()
        assert dest.count() == 1


@pytest.mark.postgres
class TestClassifyPgError:
    """Real errors from a real server, mapped by classify_pg_error."""

    @pytest.mark.parametrize(
        "statements",
        [
            ('SELECT \'{"a":"\\u0000"}\'::jsonb',),
            ("SELECT 'nope'::integer",),
            ("SELECT 1 / 0",),
            ("CREATE TEMP TABLE t (k text PRIMARY KEY)", "INSERT INTO t VALUES ('a'), ('a')"),
            ("CREATE TEMP TABLE t (k text NOT NULL)", "INSERT INTO t VALUES (NULL)"),
        ],
        ids=["22P05-untranslatable", "22P02-invalid-text", "22012-division", "23505-unique", "23502-not-null"],
    )
    def test_data_and_integrity_errors_are_the_entrys(self, postgres_db_url: str, statements: tuple[str, ...]) -> None:
        """Class 22 (data exception) and class 23 (integrity violation) reject the entry."""
        assert isinstance(classify_pg_error(sql_error(postgres_db_url, *statements)), EntryRejected)

    @pytest.mark.parametrize(
        "statements",
        [
            ("SET statement_timeout = 10", "SELECT pg_sleep(1)"),
            ("SET default_transaction_read_only = on", "CREATE TEMP TABLE t (k text)"),
            ("SELECT * FROM no_such_table",),
            ("SET lock_timeout = 10", "SELECT pg_advisory_lock(1)"),
        ],
        ids=["57014-statement-timeout", "25006-read-only", "42P01-undefined-table", "55P03-lock-timeout"],
    )
    def test_server_side_trouble_is_unavailable(self, postgres_db_url: str, statements: tuple[str, ...]) -> None:
        """A timeout, a read-only server, a missing table or a lock wait is no entry's fault."""
        with psycopg.connect(postgres_db_url, autocommit=True) as holder:
            # Held elsewhere, for the lock-timeout case.
            holder.execute("SELECT pg_advisory_lock(1)")
            exc = sql_error(postgres_db_url, *statements)
        assert isinstance(classify_pg_error(exc), DestinationUnavailable)

    def test_terminated_backend_is_unavailable(self, postgres_db_url: str) -> None:
        """A connection killed by the server (57P01 admin_shutdown) reads as unavailable."""
        with psycopg.connect(postgres_db_url, autocommit=True) as victim:
            fetch(postgres_db_url, "SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
            with pytest.raises(psycopg.Error) as caught:
                victim.execute("SELECT 1")
        assert caught.value.sqlstate == "57P01"
        assert isinstance(classify_pg_error(caught.value), DestinationUnavailable)

    def test_deadlock_is_unavailable(self, postgres_db_url: str) -> None:
        """A deadlock (40P01) is transient contention, so it uses no attempts."""
        errors: list[psycopg.Error] = []
        with psycopg.connect(postgres_db_url) as a, psycopg.connect(postgres_db_url) as b:
            for conn in (a, b):
                conn.execute("SET deadlock_timeout = '50ms'")
            a.execute("SELECT pg_advisory_xact_lock(1)")
            b.execute("SELECT pg_advisory_xact_lock(2)")

            def cross(conn: psycopg.Connection[tuple[object, ...]], key: int) -> None:
                try:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
                except psycopg.Error as exc:
                    errors.append(exc)
                    conn.rollback()
                else:
                    conn.commit()

            threads = [threading.Thread(target=cross, args=(a, 2)), threading.Thread(target=cross, args=(b, 1))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        assert [e.sqlstate for e in errors] == ["40P01"]
        assert isinstance(classify_pg_error(errors[0]), DestinationUnavailable)

    def test_refused_connection_is_unavailable(self, dead_postgres_url: str) -> None:
        """Nothing listening on the port (no SQLSTATE) reads as unavailable."""
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(dead_postgres_url, connect_timeout=2)
        assert isinstance(classify_pg_error(caught.value), DestinationUnavailable)

    def test_missing_database_is_unavailable(self, postgres_server: PostgresServer) -> None:
        """A database that does not exist is an operator's problem, not the entry's."""
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(postgres_server.url(f"missing_{uuid.uuid4().hex[:8]}"))
        assert isinstance(classify_pg_error(caught.value), DestinationUnavailable)


class TestClassifyWithoutServer:
    @pytest.mark.parametrize(
        "exc",
        [
            psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
            psycopg.InterfaceError("the connection is closed"),
            psycopg.errors.lookup("40001")("could not serialize access"),
            psycopg.errors.lookup("53100")("could not extend file: No space left on device"),
            psycopg.errors.lookup("53300")("too many connections"),
            psycopg.errors.lookup("57P03")("the database system is starting up"),
            ConnectionResetError("reset by peer"),
        ],
        ids=["pool-timeout", "closed", "40001", "53100", "53300", "57P03", "oserror"],
    )
    def test_connection_trouble_is_unavailable(self, exc: Exception) -> None:
        """Pool timeouts, lost connections, contention and a full or busy server use no attempts."""
        assert isinstance(classify_pg_error(exc), DestinationUnavailable)

    @pytest.mark.parametrize(
        "exc",
        [
            psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
            psycopg.errors.lookup("54000")("index row size exceeds btree maximum"),
            ValueError("anything else"),
        ],
        ids=["client-nul", "54000", "other"],
    )
    def test_everything_else_is_the_entrys(self, exc: Exception) -> None:
        """What is not known to mean "unavailable" counts against the entry, as in SQLite."""
        assert isinstance(classify_pg_error(exc), EntryRejected)

    def test_destination_errors_pass_through(self) -> None:
        """An error already classified is returned as it is."""
        exc = DestinationUnavailable("closed")
        assert classify_pg_error(exc) is exc

    def test_message_keeps_only_the_first_line(self) -> None:
        """The server's DETAIL/CONTEXT lines, which quote the payload, stay out of the message."""
        exc = psycopg.errors.lookup("22P05")('unsupported Unicode escape sequence\nCONTEXT: {"secret": 1}')
        assert "secret" not in str(classify_pg_error(exc))


@pytest.mark.postgres
class TestOutage:
    def test_server_down_at_start_does_not_fail_construction(self, dead_postgres_url: str) -> None:
        """Building the destination connects to nothing; the first probe and write are then unavailable."""
        d = PostgresDestination(DEST, dead_postgres_url, connect_timeout=1.0)
        try:
            started = time.monotonic()
            with pytest.raises(DestinationUnavailable):
                d.probe()
            with pytest.raises(DestinationUnavailable):
                d.write([numbered_entry(1)])
            assert time.monotonic() - started < 10
        finally:
            d.close()

    def test_stopped_server_is_unavailable_and_the_same_object_recovers(self, managed_postgres: PostgresServer) -> None:
        """Server stopped: write and probe are unavailable; started again: the same destination writes."""
        name = managed_postgres.create_database()
        d = PostgresDestination(DEST, managed_postgres.url(name), connect_timeout=1.0)
        try:
            d.write([numbered_entry(1)])
            managed_postgres.stop("fast")
            with pytest.raises(DestinationUnavailable):
                d.write([numbered_entry(2)])
            with pytest.raises(DestinationUnavailable):
                d.probe()
            managed_postgres.start()
            wait_for_probe(d)
            d.write([numbered_entry(2)])
            assert d.count() == 2
        finally:
            d.close()
            managed_postgres.drop_database(name)

    def test_closed_destination_is_unavailable_and_close_is_idempotent(self, dest: PostgresDestination) -> None:
        """After close(), calls raise DestinationUnavailable, and closing again is harmless."""
        dest.probe()
        dest.close()
        dest.close()
        with pytest.raises(DestinationUnavailable):
            dest.write([numbered_entry(1)])


@pytest.mark.postgres
class TestQuery:
    def test_pages_return_every_row_once_oldest_first(self, dest: PostgresDestination) -> None:
        """Following `next` over several pages yields each row once, in delivery order, then null."""
        for start in range(0, 23, 4):
            dest.write([numbered_entry(i) for i in range(start, min(start + 4, 23))])
        seen, pages = page_through(dest, limit=5)
        assert seen == [f"{i:032x}" for i in range(23)]
        assert pages == 5

    def test_exact_last_page_has_no_next(self, dest: PostgresDestination) -> None:
        """A page that ends exactly at the last row says there is nothing more."""
        dest.write([numbered_entry(i) for i in range(4)])
        records, cursor = dest.query(limit=4)
        assert len(records) == 4
        assert cursor is None

    def test_filters_by_source_and_subject(self, dest: PostgresDestination) -> None:
        """`source` and `subject` narrow the rows, alone or together."""
        dest.write(
            [
                numbered_entry(1, source="a", subject="x"),
                numbered_entry(2, source="b", subject="x"),
                numbered_entry(3, source="a", subject="y"),
            ]
        )

        def ids(source: str | None = None, subject: str | None = None) -> list[int]:
            return [int(str(r["payload_id"]), 16) for r in dest.query(source=source, subject=subject)[0]]

        assert ids(source="a") == [1, 3]
        assert ids(subject="x") == [1, 2]
        assert ids(source="a", subject="x") == [1]
        assert ids(source="nobody") == []

    def test_records_have_the_contract_fields_and_sqlite_timestamps(self, dest: PostgresDestination) -> None:
        """A record carries the contract's keys, the decoded payload and UTC timestamps formatted as SQLite's."""
        entry = numbered_entry(
            7,
            subject="s",
            payload=b'{"nested": {"k": [1, 2]}, "u": "\\u00e9"}',
            received_base=RECEIVED_WITH_MICROSECONDS,
        )
        dest.write([entry])
        [record], _ = dest.query()
        assert set(record) == RECORD_KEYS
        assert orjson.loads(orjson.dumps(record["payload"])) == {"nested": {"k": [1, 2]}, "u": "é"}
        assert record["received_at"] == format_timestamp(entry.received_at)
        assert TIMESTAMP.fullmatch(str(record["delivered_at"]))
        assert (record["subject"], record["idempotency_key"]) == ("s", "key-7")

    def test_payloads_are_read_back_as_stored_text_with_every_digit(self, dest: PostgresDestination) -> None:
        """Integers past 64 bits come back exactly: the JSONB text is handed on, never decoded to floats."""
        dest.write([numbered_entry(1, payload=b'{"id": 18446744073709551617, "x": 12345678901234567890123}')])
        records, _ = dest.query()
        text = orjson.dumps(records)
        assert b"18446744073709551617" in text
        assert b"12345678901234567890123" in text

    def test_a_page_is_cut_by_its_byte_budget(self, dest: PostgresDestination) -> None:
        """Records of 300 kB with a 1 MB budget come three to a page, and the cursor goes on from there."""
        dest.write([numbered_entry(i, payload=b'{"pad": "' + b"p" * 300_000 + b'"}') for i in range(7)])
        pages: list[int] = []
        cursor: str | None = None
        while True:
            records, cursor = dest.query(limit=1000, after=cursor, max_bytes=1_000_000)
            pages.append(len(records))
            if cursor is None:
                break
        assert pages == [3, 3, 1]

    def test_sources_keep_only_those_sources_records(self, dest: PostgresDestination) -> None:
        """query(sources=[...]) reads the rows of those sources only; an empty list reads nothing."""
        dest.write([numbered_entry(1, source="a"), numbered_entry(2, source="b"), numbered_entry(3, source="c")])
        assert [r["source"] for r in dest.query(sources=["a", "c"])[0]] == ["a", "c"]
        assert dest.query(sources=[])[0] == []

    def test_only_this_destinations_rows(self, dest: PostgresDestination, postgres_db_url: str) -> None:
        """Two destinations sharing a database each see only their own rows."""
        other = PostgresDestination("other", postgres_db_url)
        try:
            dest.write([numbered_entry(1)])
            other.write([numbered_entry(2)])
            assert [r["payload_id"] for r in other.query()[0]] == [f"{2:032x}"]
            assert (dest.count(), other.count()) == (1, 1)
        finally:
            other.close()

    @pytest.mark.parametrize("cursor", ["", "!!", "c2VxOg", "c2VxOjE5OTk5OTk5OTk5OTk5OTk5OTk5"])
    def test_malformed_cursor_is_a_value_error(self, dest: PostgresDestination, cursor: str) -> None:
        """A cursor not made by this service is refused with ValueError before any query."""
        with pytest.raises(ValueError, match="cursor"):
            dest.query(after=cursor)


class TestOpenDestination:
    def test_package_import_does_not_import_psycopg(self) -> None:
        """Importing the destinations package (as gunicorn's master may) leaves psycopg unimported."""
        code = "import sys, nexus_gevent.destinations; print('psycopg' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"

    @pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
    def test_postgres_urls_open_a_postgres_destination(self, scheme: str, dead_postgres_url: str) -> None:
        """postgresql:// and postgres:// URLs build a PostgresDestination without connecting."""
        d = open_destination("pg", dead_postgres_url.replace("postgresql", scheme, 1))
        try:
            assert isinstance(d, PostgresDestination)
            assert d.name == "pg"
        finally:
            d.close()

    def test_malformed_url_is_a_config_error_without_the_url(self) -> None:
        """A URL libpq cannot parse is a ConfigError whose message does not echo it (passwords)."""
        with pytest.raises(ConfigError) as caught:
            open_destination("pg", "postgresql://user:s3cret@[::1/db")
        assert "s3cret" not in str(caught.value)

    def test_pool_bounds_are_checked(self) -> None:
        """A pool_min above pool_max is a ConfigError."""
        with pytest.raises(ConfigError):
            PostgresDestination("pg", "postgresql://127.0.0.1/x", pool_min=5, pool_max=2)


@pytest.mark.postgres
class TestGevent:
    def run_check(self, url: str, *extra: str) -> dict[str, object]:
        env = {k: v for k, v in os.environ.items() if k != "PSYCOPG_WAIT_FUNC"}
        out = subprocess.run(
            [sys.executable, "-m", "tests.support.postgres_gevent_check", url, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def test_queries_overlap_and_the_hub_keeps_ticking(self, postgres_db_url: str) -> None:
        """Patched first, five greenlets' 0.5 s queries overlap and a 10 ms ticker never stalls."""
        result = self.run_check(postgres_db_url)
        assert "error" not in result, result
        assert float(str(result["elapsed"])) < 1.5, result
        assert int(str(result["ticks"])) >= 20, result
        assert float(str(result["max_gap"])) < 0.25, result

    def test_psycopg_imported_before_patching_is_refused(self, postgres_db_url: str) -> None:
        """If psycopg was imported before patch_all(), building the destination fails loudly."""
        result = self.run_check(postgres_db_url, "--import-psycopg-first")
        assert "imported before gevent" in str(result.get("error")), result
