"""The SQLite destination, against real database files."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import gevent  # type: ignore[import-untyped, unused-ignore]
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_gevent import _sqlite_thread
from nexus_gevent.destinations import open_destination, sqlite_path
from nexus_gevent.destinations import sqlite as sqlite_dest
from nexus_gevent.destinations._sql import decode_cursor, encode_cursor, format_timestamp
from nexus_gevent.destinations.sqlite import SCHEMA_VERSION, SQLiteDestination, classify_sqlite_error
from nexus_gevent.errors import ConfigError, DestinationUnavailable, EntryRejected
from tests.support.destinations import DEST, RECORD_KEYS, TIMESTAMP, numbered_entry, page_through


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "nexus.db")


@pytest.fixture
def dest(db_path: str) -> Iterator[SQLiteDestination]:
    d = SQLiteDestination(DEST, db_path)
    yield d
    d.close()


def raw(db_path: str) -> sqlite3.Connection:
    """A plain connection from the test's own thread, as another process would have."""
    return sqlite3.connect(db_path, isolation_level=None)


class TestOpenDestination:
    def test_three_slashes_give_a_relative_path(self) -> None:
        """sqlite:///var/nexus.db names var/nexus.db, relative to the working directory."""
        assert sqlite_path("sqlite:///var/nexus.db") == "var/nexus.db"

    def test_four_slashes_give_an_absolute_path(self) -> None:
        """sqlite:////abs/x.db names /abs/x.db."""
        assert sqlite_path("sqlite:////abs/x.db") == "/abs/x.db"

    @pytest.mark.parametrize("url", ["sqlite:///", "sqlite://host/x.db", "sqlite:///dir/", "sqlite:///x.db?mode=ro"])
    def test_unusable_sqlite_urls_are_config_errors(self, url: str) -> None:
        """A SQLite URL without a file, with a host, or with options is refused."""
        with pytest.raises(ConfigError):
            sqlite_path(url)

    def test_sqlite_url_opens_a_sqlite_destination(self, tmp_path: Path) -> None:
        """open_destination dispatches sqlite:// to SQLiteDestination, with name and path."""
        d = open_destination("archive", f"sqlite:///{tmp_path}/a.db")
        try:
            assert isinstance(d, SQLiteDestination)
            assert d.name == "archive"
            assert d.path == f"{tmp_path}/a.db"
        finally:
            d.close()

    @pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "nexus.db"])
    def test_unknown_scheme_is_a_config_error_without_the_url(self, url: str) -> None:
        """An unknown scheme is a ConfigError whose message does not echo a possible password."""
        with pytest.raises(ConfigError) as info:
            open_destination("x", url)
        assert "secret" not in str(info.value)


class TestSchema:
    def test_table_has_the_contract_columns(self, dest: SQLiteDestination, db_path: str) -> None:
        """nexus_entries has the contract's columns, payload_id as primary key, NOT NULL where required."""
        dest.probe()
        info = {row[1]: row for row in raw(db_path).execute("PRAGMA table_info(nexus_entries)")}
        assert set(info) == {
            "payload_id",
            "seq",
            "source",
            "destination",
            "subject",
            "idempotency_key",
            "received_at",
            "delivered_at",
            "payload",
        }
        not_null = {name for name, row in info.items() if row[3]}
        assert not_null == set(info) - {"subject", "idempotency_key"}
        assert [name for name, row in info.items() if row[5]] == ["payload_id"]
        assert info["payload_id"][2] == "TEXT"

    def test_pragmas_are_wal_full_busy_timeout_and_checkpoint_interval(self, db_path: str) -> None:
        """WAL mode; the connection syncs FULL, waits busy_timeout for locks, checkpoints every 10,000 pages."""
        d = SQLiteDestination(DEST, db_path, busy_timeout_ms=1234)
        try:
            d.probe()

            def settings(conn: sqlite3.Connection) -> tuple[object, ...]:
                # Run in the destination's own thread, where the connection lives.
                return tuple(
                    conn.execute(f"PRAGMA {p}").fetchone()[0]
                    for p in ("synchronous", "busy_timeout", "wal_autocheckpoint")
                )

            assert d._run(settings) == (2, 1234, sqlite_dest.WAL_AUTOCHECKPOINT_PAGES)  # 2 is FULL
            assert raw(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            d.close()

    def test_missing_parent_directory_is_created(self, tmp_path: Path) -> None:
        """A database path in a directory that does not exist yet works."""
        d = SQLiteDestination(DEST, str(tmp_path / "a" / "b" / "nexus.db"))
        try:
            d.write([numbered_entry(1)])
            assert d.count() == 1
        finally:
            d.close()

    def test_reopening_a_version_1_file_is_a_no_op_migration(self, db_path: str) -> None:
        """A file already at version 1 keeps its schema and rows when opened again."""
        first = SQLiteDestination(DEST, db_path)
        first.write([numbered_entry(1)])
        first.close()
        schema_before = raw(db_path).execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()

        second = SQLiteDestination(DEST, db_path)
        try:
            second.probe()
            assert second.count() == 1
        finally:
            second.close()
        conn = raw(db_path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == schema_before

    def test_a_newer_schema_version_makes_the_destination_unavailable(self, db_path: str) -> None:
        """A file migrated by newer code is not touched; probe reports it unavailable."""
        raw(db_path).execute("PRAGMA user_version = 99")
        d = SQLiteDestination(DEST, db_path)
        try:
            with pytest.raises(DestinationUnavailable, match="newer"):
                d.probe()
        finally:
            d.close()
        assert raw(db_path).execute("PRAGMA user_version").fetchone()[0] == 99

    def test_an_unopenable_file_makes_the_destination_unavailable(self, tmp_path: Path) -> None:
        """A path that cannot hold a database reads as unavailable, not as a crash."""
        (tmp_path / "file").write_text("not a directory")
        d = SQLiteDestination(DEST, str(tmp_path / "file" / "nexus.db"))
        try:
            with pytest.raises(DestinationUnavailable):
                d.probe()
            with pytest.raises(DestinationUnavailable):
                d.write([numbered_entry(1)])
        finally:
            d.close()


class TestWrite:
    def test_row_holds_the_entry_and_utc_timestamps(self, dest: SQLiteDestination, db_path: str) -> None:
        """A written row carries every entry field, JSON text, and microsecond UTC 'Z' timestamps."""
        entry = numbered_entry(7, source="web", subject="orders")
        before = time.time()
        dest.write([entry])
        row = (
            raw(db_path)
            .execute(
                "SELECT payload_id, source, destination, subject, idempotency_key, received_at,"
                " delivered_at, payload FROM nexus_entries"
            )
            .fetchone()
        )
        assert row[:5] == (entry.payload_id, "web", DEST, "orders", "key-7")
        assert row[5] == "2023-11-14T22:13:27.000000Z"
        assert TIMESTAMP.fullmatch(row[6])
        assert row[6] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before))
        assert orjson.loads(row[7]) == {"n": 7}

    def test_same_payload_id_twice_leaves_one_row(self, dest: SQLiteDestination) -> None:
        """Rewriting a payload_id, in a later batch or the same one, keeps exactly one row."""
        dest.write([numbered_entry(1)])
        dest.write([numbered_entry(1), numbered_entry(2)])
        dest.write([numbered_entry(3), numbered_entry(3)])
        assert dest.count() == 3

    def test_a_large_batch_is_stored(self, dest: SQLiteDestination) -> None:
        """A batch of 2,000 entries lands whole."""
        dest.write([numbered_entry(i) for i in range(2000)])
        assert dest.count() == 2000

    @pytest.mark.parametrize(
        "payload",
        [
            b'{"emoji":"\xf0\x9f\xa6\x8a","cjk":"\xe6\x97\xa5\xe6\x9c\xac"}',
            b'{ "spaced" : [ 1 , 2.50 , 1e3 ] ,\t"quote":"a\\"b\\\\c" }',
            b'{"escapes":"\\u0000\\n\\t\\ud83e\\udd8a\\/","big":12345678901234567890123}',
            b'{"nested":{"a":{"b":[{"c":null}]}},"t":true,"f":false}',
        ],
    )
    def test_payload_text_is_stored_byte_for_byte(self, dest: SQLiteDestination, db_path: str, payload: bytes) -> None:
        """The stored payload is the JSON text as sent: spacing, escapes, digits and non-ASCII kept."""
        dest.write([numbered_entry(1), numbered_entry(2, payload=payload)])
        stored = raw(db_path).execute("SELECT payload FROM nexus_entries ORDER BY seq").fetchall()
        assert [row[0].encode("utf-8") for row in stored] == [b'{"n":1}', payload]

    @settings(max_examples=60, deadline=None)
    @given(
        st.dictionaries(
            st.text(max_size=8), st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1) | st.none(), max_size=4
        )
    )
    def test_any_object_round_trips_through_the_row(
        self, tmp_path_factory: pytest.TempPathFactory, value: dict[str, object]
    ) -> None:
        """Whatever strings a payload holds, the row's payload is the entry's text exactly."""
        db = str(tmp_path_factory.mktemp("rt") / "nexus.db")
        d = SQLiteDestination(DEST, db)
        try:
            payload = orjson.dumps(value)
            d.write([numbered_entry(1, payload=payload)])
            assert raw(db).execute("SELECT payload FROM nexus_entries").fetchone()[0].encode("utf-8") == payload
        finally:
            d.close()

    def test_a_transaction_over_several_statements_keeps_seq_in_entry_order(
        self, dest: SQLiteDestination, db_path: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Split into many INSERT statements, a transaction stores every row, seq unique and in the entries' order."""
        monkeypatch.setattr(sqlite_dest, "CHUNK_BYTES", 50)
        dest.write([numbered_entry(i) for i in range(10)])
        dest.write([numbered_entry(i) for i in range(5, 30)])  # 5-9 known: skipped, the rest follow
        rows = raw(db_path).execute("SELECT payload_id, seq FROM nexus_entries ORDER BY seq").fetchall()
        assert [pid for pid, _ in rows] == [f"{i:032x}" for i in range(30)]
        assert len({seq for _, seq in rows}) == 30

    def test_a_batch_is_all_or_nothing(self, dest: SQLiteDestination) -> None:
        """One refused entry rolls back the whole batch and the connection stays usable."""
        batch = [numbered_entry(i) for i in range(10)] + [numbered_entry(10, payload=b"[1, 2]")]
        with pytest.raises(EntryRejected, match="payload_is_json_object"):
            dest.write(batch)
        assert dest.count() == 0
        dest.write(batch[:10])
        assert dest.count() == 10

    @pytest.mark.parametrize("payload", [b"not json", b'"a string"', b"\xff\xfe{}"])
    def test_a_payload_that_is_not_a_utf8_json_object_is_rejected(
        self, dest: SQLiteDestination, payload: bytes
    ) -> None:
        """Invalid JSON, a non-object, or bytes that are not UTF-8 raise EntryRejected."""
        with pytest.raises(EntryRejected):
            dest.write([numbered_entry(1, payload=payload)])
        assert dest.count() == 0

    def test_a_refused_write_is_raised_not_printed_by_the_hub(
        self, dest: SQLiteDestination, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """An expected failure reaches the caller only; gevent's hub prints no traceback for it."""
        with pytest.raises(EntryRejected):
            dest.write([numbered_entry(1, payload=b"[]")])
        assert capfd.readouterr().err == ""

    def test_close_is_idempotent_and_later_calls_are_unavailable(self, db_path: str) -> None:
        """close() twice is fine; a closed destination reports itself unavailable."""
        d = SQLiteDestination(DEST, db_path)
        d.write([numbered_entry(1)])
        d.close()
        d.close()
        with pytest.raises(DestinationUnavailable, match="closed"):
            d.write([numbered_entry(2)])
        with pytest.raises(DestinationUnavailable):
            d.probe()

    def test_close_without_any_use(self, db_path: str) -> None:
        """A destination never used closes without creating the file."""
        SQLiteDestination(DEST, db_path).close()
        assert not Path(db_path).exists()


class TestClassifySqliteError:
    @pytest.mark.parametrize(
        "message",
        [
            "database is locked",
            "unable to open database file",
            "disk I/O error",
            "database or disk is full",
            "attempt to write a readonly database",
        ],
    )
    def test_unavailability_messages_map_to_unavailable(self, message: str) -> None:
        """OperationalErrors without a result code are classified by their message."""
        assert isinstance(classify_sqlite_error(sqlite3.OperationalError(message)), DestinationUnavailable)

    def test_an_os_error_reaching_the_file_maps_to_unavailable(self) -> None:
        """An OSError (the folder cannot be made, the file cannot be opened) is an outage, not the entry's fault."""
        exc = PermissionError(13, "Permission denied", "/srv/nexus/nexus.db")
        assert isinstance(classify_sqlite_error(exc), DestinationUnavailable)

    def test_extended_io_error_code_maps_to_unavailable(self) -> None:
        """An extended result code (SQLITE_IOERR_FSYNC) counts by its primary code."""
        exc = sqlite3.OperationalError("some wording we do not know")
        exc.sqlite_errorcode = 1034  # SQLITE_IOERR_FSYNC
        assert isinstance(classify_sqlite_error(exc), DestinationUnavailable)

    @pytest.mark.parametrize(
        "exc",
        [
            sqlite3.IntegrityError("NOT NULL constraint failed: nexus_entries.source"),
            sqlite3.DataError("string or blob too big"),
            sqlite3.ProgrammingError("Incorrect number of bindings supplied"),
            sqlite3.OperationalError("no such table: nexus_entries"),
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            ValueError("something else"),
        ],
    )
    def test_everything_else_rejects_the_entry(self, exc: Exception) -> None:
        """Errors not known to mean "unavailable" are EntryRejected, with the cause in the message."""
        classified = classify_sqlite_error(exc)
        assert isinstance(classified, EntryRejected)
        assert str(exc) in str(classified)

    def test_a_real_lock_timeout_maps_to_unavailable(self, db_path: str) -> None:
        """'database is locked' from a real busy timeout is DestinationUnavailable, chained."""
        d = SQLiteDestination(DEST, db_path, busy_timeout_ms=50)
        try:
            d.probe()
            blocker = raw(db_path)
            blocker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(DestinationUnavailable) as info:
                d.write([numbered_entry(1)])
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            assert "database is locked" in str(info.value.__cause__)
            blocker.execute("ROLLBACK")
            d.write([numbered_entry(1)])
            assert d.count() == 1
        finally:
            d.close()


class TestCooperation:
    def _ticker(self) -> tuple[list[int], gevent.Greenlet[[], None]]:
        ticks = [0]

        def tick() -> None:
            while True:
                gevent.sleep(0.01)
                ticks[0] += 1

        return ticks, gevent.spawn(tick)

    def test_other_greenlets_run_while_a_write_waits_for_a_lock(self, db_path: str) -> None:
        """A write stuck in SQLite's busy wait blocks only its greenlet, not the hub."""
        d = SQLiteDestination(DEST, db_path, busy_timeout_ms=1000)
        blocker = raw(db_path)
        try:
            d.probe()
            blocker.execute("BEGIN EXCLUSIVE")
            ticks, ticker = self._ticker()
            started = time.monotonic()
            with pytest.raises(DestinationUnavailable):
                d.write([numbered_entry(1)])
            waited = time.monotonic() - started
            gevent.kill(ticker)
            assert waited >= 0.9
            # About 100 ticks fit in the wait; on the hub there would be none.
            assert ticks[0] >= 30
        finally:
            blocker.close()
            d.close()

    def test_a_write_waiting_for_a_lock_succeeds_once_it_is_released(self, db_path: str) -> None:
        """A greenlet can release the lock while another greenlet's write is waiting for it."""
        d = SQLiteDestination(DEST, db_path)
        blocker = raw(db_path)
        try:
            d.probe()
            blocker.execute("BEGIN EXCLUSIVE")

            def release_later() -> None:
                gevent.sleep(0.3)
                blocker.execute("ROLLBACK")

            releaser = gevent.spawn(release_later)
            started = time.monotonic()
            d.write([numbered_entry(1)])
            assert time.monotonic() - started >= 0.25
            releaser.join()
            assert d.count() == 1
        finally:
            blocker.close()
            d.close()


class TestQuery:
    def test_paging_returns_every_row_once_oldest_first(self, dest: SQLiteDestination) -> None:
        """Following `next` through pages of 7 yields all 25 rows once, in write order, then None."""
        order = [12, 3, 25, 1, 7] + [i for i in range(30, 50)]
        for i in order:
            dest.write([numbered_entry(i)])
        seen, pages = page_through(dest, limit=7)
        assert seen == [f"{i:032x}" for i in order]
        assert pages == 4

    def test_an_exactly_full_last_page_has_no_next(self, dest: SQLiteDestination) -> None:
        """When the rows end on a page boundary, that page's `next` is None."""
        dest.write([numbered_entry(i) for i in range(4)])
        first, cursor = dest.query(limit=2)
        assert cursor is not None
        second, cursor = dest.query(limit=2, after=cursor)
        assert cursor is None
        assert [r["payload_id"] for r in first + second] == [f"{i:032x}" for i in range(4)]

    def test_records_have_the_contract_shape(self, dest: SQLiteDestination) -> None:
        """A record has exactly the contract's keys and its payload as a JSON value."""
        dest.write([numbered_entry(1, source="web", subject="s")])
        records, cursor = dest.query()
        assert cursor is None
        (record,) = records
        assert set(record) == RECORD_KEYS
        assert orjson.loads(orjson.dumps(record["payload"])) == {"n": 1}
        assert record["source"] == "web"
        assert record["subject"] == "s"
        assert record["idempotency_key"] == "key-1"
        assert record["received_at"] == "2023-11-14T22:13:21.000000Z"
        assert TIMESTAMP.fullmatch(str(record["delivered_at"]))

    def test_filters_by_source_and_subject(self, dest: SQLiteDestination) -> None:
        """source and subject narrow the rows, alone or together, and paging still works."""
        dest.write([numbered_entry(i, source="a" if i % 2 else "b", subject="x" if i % 3 else None) for i in range(30)])

        def all_ids(source: str | None = None, subject: str | None = None) -> list[str]:
            return page_through(dest, limit=4, source=source, subject=subject)[0]

        assert all_ids(source="a") == [f"{i:032x}" for i in range(30) if i % 2]
        assert all_ids(subject="x") == [f"{i:032x}" for i in range(30) if i % 3]
        assert all_ids(source="b", subject="x") == [f"{i:032x}" for i in range(30) if not i % 2 and i % 3]
        assert all_ids(source="nobody") == []

    def test_only_this_destinations_rows_are_returned(self, dest: SQLiteDestination, db_path: str) -> None:
        """Two destinations sharing one file each see only the rows they stored."""
        other = SQLiteDestination("other", db_path)
        try:
            dest.write([numbered_entry(1)])
            other.write([numbered_entry(2)])
            assert [r["payload_id"] for r in dest.query()[0]] == [f"{1:032x}"]
            assert [r["payload_id"] for r in other.query()[0]] == [f"{2:032x}"]
            assert other.count() == 1
        finally:
            other.close()

    @pytest.mark.parametrize(
        "cursor",
        ["", "!!!", "not a cursor", encode_cursor(5) + "$", "c2VxOi0x", "eHl6OjE", "c2VxOg", encode_cursor(2**63)],
    )
    def test_a_malformed_cursor_raises_value_error(self, dest: SQLiteDestination, cursor: str) -> None:
        """Cursors not made by this destination (bad base64, wrong prefix, negative, empty, huge) raise ValueError."""
        with pytest.raises(ValueError):
            dest.query(after=cursor)

    @settings(max_examples=2000, deadline=None)
    @given(st.floats(min_value=0, max_value=2**32, allow_nan=False) | st.integers(0, 2**32).map(lambda n: n + 0.5e-6))
    def test_timestamps_are_formatted_as_datetime_formats_them(self, epoch: float) -> None:
        """format_timestamp gives datetime's own text for any time, rounding included."""
        assert format_timestamp(epoch) == datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def test_cursor_round_trips(self) -> None:
        """decode_cursor inverts encode_cursor."""
        assert decode_cursor(encode_cursor(123456789)) == 123456789

    def test_limit_below_one_is_refused(self, dest: SQLiteDestination) -> None:
        """limit=0 raises ValueError rather than returning an empty page with a cursor."""
        with pytest.raises(ValueError):
            dest.query(limit=0)


class TestEnableWal:
    """Two workers opening a new shared file race to switch it to WAL; the loser retries instead of failing."""

    def test_a_locked_journal_mode_change_is_retried_until_the_lock_goes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """SQLite answers "database is locked" at once; enable_wal tries again and ends in WAL mode."""
        path = tmp_path / "shared.db"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        opener = sqlite3.connect(path, isolation_level=None, timeout=0)
        pauses: list[float] = []

        def pause(seconds: float) -> None:
            # The other worker finishes its own switch while this one waits.
            pauses.append(seconds)
            if holder.in_transaction:
                holder.execute("COMMIT")

        monkeypatch.setattr(_sqlite_thread, "_thread_sleep", pause)
        try:
            assert _sqlite_thread.enable_wal(opener, timeout_s=5) == "wal"
        finally:
            opener.close()
            holder.close()
        assert len(pauses) == 1

    def test_a_lock_that_outlasts_the_timeout_is_raised(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Past the timeout the "database is locked" error reaches the caller: a worker does not wait forever."""
        path = tmp_path / "shared.db"
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        opener = sqlite3.connect(path, isolation_level=None, timeout=0)
        monkeypatch.setattr(_sqlite_thread, "_thread_sleep", lambda seconds: None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                _sqlite_thread.enable_wal(opener, timeout_s=0.05)
        finally:
            opener.close()
            holder.close()


class TestSQLiteThread:
    """The one connection confined to its own OS thread, used by the destination, the key index and the dead letters."""

    def test_close_twice_is_harmless_and_a_closed_thread_refuses_work(self, tmp_path: Path) -> None:
        """close() a second time does nothing; run() after close raises as a closed sqlite3 connection does."""
        thread = _sqlite_thread.SQLiteThread(tmp_path / "t.db", lambda conn: None)
        assert thread.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
        thread.close()
        thread.close()
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            thread.run(lambda conn: None)

    def test_an_open_failure_is_raised_as_open_error_makes_it_and_retried_on_the_next_run(self, tmp_path: Path) -> None:
        """A file that cannot be opened raises open_error's exception, chained; once it can, the next run opens it."""
        blocker = tmp_path / "dir"
        blocker.write_text("a file where the folder should be")
        thread = _sqlite_thread.SQLiteThread(
            blocker / "t.db", lambda conn: None, open_error=lambda exc: DestinationUnavailable(str(exc))
        )
        try:
            with pytest.raises(DestinationUnavailable) as info:
                thread.open()
            assert isinstance(info.value.__cause__, OSError)
            blocker.unlink()
            assert thread.run(lambda conn: conn.execute("SELECT 1").fetchone()[0]) == 1
        finally:
            thread.close()
