"""The PostgreSQL destination: the `nexus_entries` table in one PostgreSQL database.

Import this module only in a gunicorn worker, after gevent's monkey-patching:
psycopg chooses, when it is first imported, whether its waits yield to the hub or block
the whole process. Its fast C wait is never patched; it picks a `select`-based wait
instead only if gevent has already patched `select` (or PSYCOPG_WAIT_FUNC names one).
`open_destination` imports it lazily for that reason, and `PostgresDestination` refuses
to be built when the choice went the wrong way. psycopg_pool's workers and waits are
cooperative under patching; the pool is built (unopened) in the constructor and opened
on first use, so a server that is down at startup reads as "unavailable" (probe, /ready)
instead of failing the worker.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from .._json_limits import jsonb_refusal
from ..entry import Entry
from ..errors import ConfigError, DestinationError, DestinationUnavailable, EntryRejected
from ._sql import Dialect, EntryTable, Fetch, format_datetime, raise_if_outage

_T = TypeVar("_T")

Connection = psycopg.Connection[TupleRow]

#: Server-side cap on one statement: a batch of a few hundred rows takes milliseconds, so
#: reaching it means the server is sick or a lock is held, and the write is retried later.
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
#: A transaction left idle this long (its greenlet starved, its network gone) is ended by
#: the server, which also frees the write lock below for every other writer.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
#: How long the pool keeps retrying one failed connection before it gives up and lets the
#: next request start afresh. Its backoff doubles without a cap (1, 2, 4 ... s), so with
#: psycopg_pool's default of 5 min a destination back after a 1-min outage could stay
#: "unavailable" a minute longer; 10 s bounds that delay to a few seconds.
RECONNECT_TIMEOUT = 10.0
#: libpq connection settings, each used only when the URL does not name it. Keepalives and
#: tcp_user_timeout turn a silently dead server or network into an error after about
#: 25-30 s, instead of a greenlet waiting forever on a socket.
_LIBPQ_DEFAULTS: dict[str, object] = {
    "fallback_application_name": "nexus_gevent",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: libpq's connect_timeout counts whole seconds and treats 1 as 2.
_MIN_LIBPQ_CONNECT_TIMEOUT = 2

# Advisory lock keys, arbitrary but fixed, shared by every worker and node of the service
# ("nexus" in ASCII, then a number for each purpose).
_MIGRATION_LOCK_KEY = 0x6E65787573_0001
_WRITE_LOCK_KEY = 0x6E65787573_0002

# `seq` orders rows for cursor paging, as in the SQLite destination, and must follow
# COMMIT order: a reader that has paged past seq N must never later find a row with a
# smaller seq. A sequence alone does not give that: two writers take 10 and 11, 11
# commits first, a reader pages past 11, then 10 commits and is never returned. So each
# write transaction first takes one advisory lock (`_WRITE_LOCK_KEY`) and draws its seq
# values under it. The lock is released only after the commit is visible, so every seq
# drawn later belongs to a transaction that commits later. The cost is that writers to
# one database take turns, holding the lock for the INSERT and the COMMIT of one batch
# (about 5 ms for 256 rows here, so some 50k rows/s for all writers together): well
# above what the HTTP side of a node accepts, and the price of a cursor that never skips.
# The other ways out (exposing only rows below the oldest in-flight seq, or ordering by
# commit timestamps) need server settings or extensions we cannot assume.
#
# The contract fixes `payload_id` (text) as the primary key; `seq` is an identity column
# with its own UNIQUE index. The CHECK keeps the table's promise that `payload` is a
# JSON object, so reading it back for /query cannot fail.
_SCHEMA_V1 = (
    """
    CREATE TABLE IF NOT EXISTS nexus_entries (
        payload_id      text PRIMARY KEY,
        seq             bigint GENERATED ALWAYS AS IDENTITY,
        source          text NOT NULL,
        destination     text NOT NULL,
        subject         text NULL,
        idempotency_key text NULL,
        received_at     timestamptz NOT NULL,
        delivered_at    timestamptz NOT NULL,
        payload         jsonb NOT NULL
            CONSTRAINT payload_is_json_object CHECK (jsonb_typeof(payload) = 'object'),
        CONSTRAINT nexus_entries_seq_key UNIQUE (seq)
    )
    """,
    # The filtered shapes of /query; the UNIQUE index on seq serves the unfiltered one.
    "CREATE INDEX IF NOT EXISTS nexus_entries_source_seq ON nexus_entries (source, seq)",
    "CREATE INDEX IF NOT EXISTS nexus_entries_subject_seq ON nexus_entries (subject, seq)",
)

#: MIGRATIONS[n] takes the database from schema version n to n + 1. Append only.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1,)
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """
    CREATE TABLE IF NOT EXISTS nexus_schema_version (
        version    integer PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

# One statement for the whole batch: six arrays, zipped by unnest, in one round trip.
# Measured on one connection, 100k rows in batches of 256: about 45-57k rows/s, against
# 25-37k for executemany (which psycopg pipelines) and 46-61k for a COPY per batch
# (COPY cannot skip a known payload_id). The arrays go in binary (%b): in text format
# psycopg escapes every quote of every JSON payload in Python, which tripled the client's
# CPU per row. The payload travels as text and the server parses it into jsonb.
# statement_timestamp() is read after the write lock is held, so delivered_at also
# follows commit order.
# ON CONFLICT (payload_id) DO NOTHING skips a known payload_id (the contract's "exactly
# once") and only that: every other constraint still fails the batch. A payload_id twice
# in one batch is stored once too.
_INSERT = """
    INSERT INTO nexus_entries (
        payload_id, source, destination, subject, idempotency_key,
        received_at, delivered_at, payload
    )
    SELECT b.payload_id, b.source, %s, b.subject, b.idempotency_key,
           b.received_at, statement_timestamp(), b.payload::jsonb
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[])
        AS b(payload_id, source, subject, idempotency_key, received_at, payload)
    ON CONFLICT (payload_id) DO NOTHING
"""

# Settings of each new connection, in one round trip. Session settings rather than
# libpq `options`, which connection poolers such as PgBouncer refuse. synchronous_commit
# is raised to `on` only where the server turned it off: the contract marks an entry
# DELIVERED only once its commit is durable, and a stricter server setting
# (remote_apply) is kept.
_CONFIGURE = """
    SELECT set_config('statement_timeout', %s, false),
           set_config('idle_in_transaction_session_timeout', %s, false),
           CASE WHEN current_setting('synchronous_commit') = 'off'
                THEN set_config('synchronous_commit', 'on', false) END
"""

# SQLSTATE classes (first two characters) meaning "the server cannot take this write now",
# whichever entry it is. None of them can be caused by an entry's data, because the SQL
# is fixed and the data only travels as parameters.
_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "28",  # invalid authorization: the credentials were changed
        "3D",  # invalid catalog name: the database does not exist (yet, or any more)
        # Transaction rollback: 40001 serialization failure, 40P01 deadlock. Transient
        # contention, not the entry's fault: pausing costs a short probe, while using up
        # attempts could turn healthy entries into dead letters under load.
        "40",
        # Syntax error or access rule violation: our fixed SQL met a schema it does not
        # expect (table dropped, column missing) or lost its privileges. An operator's
        # problem; dead-lettering every entry meanwhile would not help.
        "42",
        "53",  # insufficient resources: 53100 disk full, 53200 out of memory, 53300 too many connections
        "55",  # object not in prerequisite state: 55P03 lock not available
        # Operator intervention: 57014 query canceled (statement_timeout), 57P01 admin
        # shutdown, 57P02 crash shutdown, 57P03 cannot connect now (starting up).
        "57",
        "58",  # system error: I/O error on the server
        "F0",  # configuration file error
        "XX",  # internal error, data or index corrupted: needs an operator, as in SQLite
    }
)
_UNAVAILABLE_STATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: connected to a standby, e.g. after a failover
        "25P03",  # idle_in_transaction_session_timeout: our transaction was starved
        "25P04",  # transaction_timeout (PostgreSQL 17)
    }
)


def classify_pg_error(exc: BaseException) -> DestinationError:
    """Map an exception from a write to DestinationUnavailable or EntryRejected.

    The SQLSTATE decides when the server sent one. Without one, connection trouble
    (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout, OSError)
    is unavailable. Everything else counts against the entries, as in the SQLite
    destination: class 22 (data exception: 22P05 for "\\u0000" in a JSON string, 22P02 for
    malformed JSON), class 23 (integrity: the payload is not an object), class 54 (a value
    too large for an index), and client-side refusals such as a NUL byte in a text field.
    """
    if isinstance(exc, DestinationError):
        return exc
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        if sqlstate is not None:
            unavailable = sqlstate in _UNAVAILABLE_STATES or sqlstate[:2] in _UNAVAILABLE_CLASSES
        else:
            # PoolTimeout, PoolClosed and libpq's connection failures are OperationalErrors;
            # InterfaceError is "the connection is closed/lost" on the client side.
            unavailable = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        if unavailable:
            return DestinationUnavailable(f"postgresql: {_first_line(exc)}")
        code = f" {sqlstate}" if sqlstate else ""
        return EntryRejected(f"postgresql {type(exc).__name__}{code}: {_first_line(exc)}")
    if isinstance(exc, OSError):
        return DestinationUnavailable(f"postgresql: {type(exc).__name__}: {exc}")
    if isinstance(exc, UnicodeDecodeError):
        return EntryRejected(f"payload is not valid UTF-8: {exc}")
    return EntryRejected(f"{type(exc).__name__}: {exc}")


def _first_line(exc: BaseException) -> str:
    # The server's DETAIL and CONTEXT lines quote the payload; the first line says what
    # went wrong, and the full text stays on the chained exception.
    return str(exc).partition("\n")[0]


def psycopg_blocks_the_hub() -> bool:
    """True when gevent has patched this process but psycopg chose its blocking wait.

    That happens when psycopg was imported before `monkey.patch_all()` (without
    PSYCOPG_WAIT_FUNC): every query would then stall all greenlets of the worker.
    """
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return False
    from psycopg import waiting

    wait_c = getattr(waiting, "wait_c", None)
    return wait_c is not None and waiting.wait is wait_c


# payload::text: the stored JSON text is handed on as it is, as for SQLite, not through psycopg's jsonb loader.
_DIALECT = Dialect(
    mark="%s", payload="payload::text", payload_bytes="octet_length(payload::text)", timestamp=format_datetime
)


class PostgresDestination(EntryTable):
    """A Destination storing entries in `nexus_entries` of one PostgreSQL database.

    Build it in the process that uses it (after gunicorn's fork and gevent's patching).
    Every call borrows a connection from a pool of `pool_min` to `pool_max` connections,
    waiting up to `connect_timeout` seconds for one; the first call also creates or
    migrates the schema. A pool that stays exhausted that long reads as "unavailable" too:
    the queue then pauses and probes, which is the back-pressure a saturated server needs.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        pool_min: int = 1,
        pool_max: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    ) -> None:
        if psycopg_blocks_the_hub():
            raise ConfigError(
                f"destination {name!r}: psycopg was imported before gevent's monkey-patching, so its "
                "queries would block every greenlet; import it only after patch_all(), or set "
                "PSYCOPG_WAIT_FUNC=wait_poll"
            )
        if not 1 <= pool_min <= pool_max:
            raise ConfigError(f"destination {name!r}: need 1 <= pool_min <= pool_max")
        if connect_timeout <= 0 or statement_timeout_ms <= 0:
            raise ConfigError(f"destination {name!r}: timeouts must be positive")
        super().__init__(name, _DIALECT)
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = statement_timeout_ms
        self._closed = False
        self._opened = False
        self._schema_ready = False
        self._pool: psycopg_pool.ConnectionPool[Connection] = psycopg_pool.ConnectionPool(
            url,
            min_size=pool_min,
            max_size=pool_max,
            open=False,
            kwargs=_connection_kwargs(name, url, connect_timeout),
            configure=self._configure,
            # One empty query per borrow: a connection broken by a server restart is
            # replaced here instead of failing the write that drew it.
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=connect_timeout,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name=f"nexus-{name}",
        )

    def write(self, entries: Sequence[Entry]) -> None:
        """Store all of `entries` in one durable transaction; a payload_id already stored is skipped."""
        if not entries:
            return
        try:
            params = self._insert_params(entries)
            with self._connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
                conn.execute(_INSERT, params)
        except Exception as exc:
            # A commit whose answer was lost reads as unavailable and is written again
            # later: harmless, since the redelivery skips the known payload_ids.
            raise classify_pg_error(exc) from exc

    def unstorable(self, payload: bytes, value: object) -> str | None:
        """Why JSONB can never hold this payload (a NUL in a string, a number's scale), or None."""
        return jsonb_refusal(payload, value)

    def probe(self) -> None:
        """Borrow a connection (creating the schema if needed) and run `SELECT 1`.

        DestinationUnavailable on any failure; the wait for a connection is bounded by
        `connect_timeout`, the query by the server's statement timeout.
        """
        try:
            with self._connection() as conn:
                conn.execute("SELECT 1").fetchone()
        except Exception as exc:
            raise DestinationUnavailable(f"postgresql: probe failed: {_first_line(exc)}") from exc

    def close(self) -> None:
        """Close every pooled connection and stop the pool's workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            self._pool.close()

    # -- internals --------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A pooled connection, the pool opened and the schema migrated first if needed.

        Tests and tools borrow it too, e.g. to run their own SQL through this pool.
        """
        if self._closed:
            raise DestinationUnavailable(f"destination {self._name!r} is closed")
        if not self._opened:
            # wait=False: connecting happens in the pool's workers; a server that is down
            # makes the borrow below time out (PoolTimeout, unavailable), not this call.
            self._pool.open(wait=False)
            self._opened = True
        with self._pool.connection() as conn:
            if not self._schema_ready:
                try:
                    migrate(conn)
                except Exception as exc:
                    # Whatever stops the schema from being ready, the entries are not at fault.
                    raise DestinationUnavailable(f"postgresql: cannot prepare the schema: {_first_line(exc)}") from exc
                self._schema_ready = True
            yield conn

    def _configure(self, conn: Connection) -> None:
        conn.execute(_CONFIGURE, (str(self._statement_timeout_ms), str(IDLE_IN_TRANSACTION_TIMEOUT_MS)))

    def _insert_params(self, entries: Sequence[Entry]) -> tuple[object, ...]:
        # `destination` is this destination's name rather than the entry's own field (they
        # agree when the queue routes correctly): /query filters on it, so a row stored
        # here must always be visible through this destination.
        # The entries of one request share their receive time: each is converted once.
        received = {t: datetime.fromtimestamp(t, UTC) for t in {e.received_at for e in entries}}
        return (
            self._name,
            [e.payload_id for e in entries],
            [e.source for e in entries],
            [e.subject for e in entries],
            [e.idempotency_key for e in entries],
            [received[e.received_at] for e in entries],
            [e.payload.decode("utf-8") for e in entries],
        )

    def _reading(self, read: Callable[[Fetch], _T]) -> _T:
        return read(self._fetch)

    def _fetch(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            with self._connection() as conn:
                return conn.execute(sql, params).fetchall()
        except Exception as exc:
            raise_if_outage(exc, classify_pg_error)
            raise


def migrate(conn: Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; a no-op on a database that is already there.

    `conn` must be in autocommit mode. The migrations run in one transaction holding an
    advisory lock, so workers and nodes starting together migrate once, one after another.
    """
    if _schema_version(conn) == SCHEMA_VERSION:
        return  # the common case, without taking the lock
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        conn.execute(_VERSION_TABLE)
        # Read again under the lock: another worker may have migrated meanwhile.
        current = _schema_version(conn)
        if current > SCHEMA_VERSION:
            raise DestinationUnavailable(
                f"postgresql: schema version {current} is newer than this code's {SCHEMA_VERSION}"
            )
        for version in range(current, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO nexus_schema_version (version) VALUES (%s)", (version + 1,))


def _schema_version(conn: Connection) -> int:
    row = conn.execute("SELECT to_regclass('nexus_schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM nexus_schema_version").fetchone()
    version: int = row[0] if row is not None else 0
    return version


def _connection_kwargs(name: str, url: str, connect_timeout: float) -> dict[str, Any]:
    try:
        named = conninfo_to_dict(url)
    except psycopg.Error as exc:
        # Only the error's kind: the URL itself may hold a password.
        raise ConfigError(f"destination {name!r}: malformed PostgreSQL URL ({type(exc).__name__})") from exc
    kwargs: dict[str, Any] = {key: value for key, value in _LIBPQ_DEFAULTS.items() if key not in named}
    if "connect_timeout" not in named:
        kwargs["connect_timeout"] = max(_MIN_LIBPQ_CONNECT_TIMEOUT, math.ceil(connect_timeout))
    # Autocommit: the code opens its transactions itself (conn.transaction()), and a probe
    # or a read leaves no transaction open on a pooled connection.
    kwargs["autocommit"] = True
    return kwargs
