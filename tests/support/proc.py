"""Real gunicorn processes for the process tests: start, wait until ready, signal, kill, inspect.

Everything here runs in the (unpatched) test process: plain OS threads, blocking
sockets and `http.client`. Each gunicorn is started in its own session, so that
`Gunicorn.cleanup` can kill the master and every worker with one `killpg`, even
after the master itself was killed.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support import services
from tests.support.services import free_port, kill_session, read_log, start_in_session

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
#: Where the gunicorns under test listen; the process tests address them by it.
HOST = services.HOST
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
TOKEN = "process-test-source-token"
ADMIN_TOKEN = "process-test-admin-token"
SOURCE = "default"
#: Small, so that a drain that hangs shows up within a test's budget; gunicorn.conf.py
#: derives graceful_timeout and the heartbeat timeout from it (+10 s each).
DRAIN_TIMEOUT = 10
#: A queue this small fills after a handful of writes while delivery is paused.
SMALL_QUEUE = {"NEXUS_QUEUE_SIZE": "5", "NEXUS_QUEUE_WORKERS": "1"}
#: How often conditions are polled while waiting for them.
POLL_INTERVAL = 0.05


class ProcessTestError(AssertionError):
    """A process did not reach the expected state in time; the message says what and shows the log."""


def wait_for(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    describe: Callable[[], str] | None = None,
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll `condition` until it returns something truthy and return that; ProcessTestError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = describe() if describe is not None else ""
            raise ProcessTestError(f"timed out after {timeout:.1f} s waiting for {what}\n{detail}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid`, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(x) for x in (task / "children").read_text().split())
    return sorted(set(found))


def is_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a reaped or zombie process holds no locks)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def has_loaded(pid: int, library: str) -> bool:
    """True once `pid` has mapped a shared object whose path contains `library` (e.g. "_sqlite3")."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def service_env(data_dir: Path, port: int, workers: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a gunicorn under test: no NEXUS_* setting leaks in from the caller's."""
    # PROMETHEUS_MULTIPROC_DIR too: gunicorn.conf.py empties it at start, so it must be
    # the one it derives from this data dir, never a folder inherited from the caller.
    inherited = ("NEXUS_", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
    env.update(
        NEXUS_DATA_DIR=str(data_dir),
        NEXUS_BIND=f"{HOST}:{port}",
        NEXUS_TOKEN=TOKEN,
        NEXUS_ADMIN_TOKEN=ADMIN_TOKEN,
        NEXUS_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT),
        WEB_CONCURRENCY=str(workers),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@dataclass
class Gunicorn:
    """One gunicorn master started by `start_gunicorn`, and what it wrote to its log."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    workers: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def db_path(self) -> Path:
        """The SQLite file of the default destination (the embedded default URL)."""
        return self.data_dir / "nexus.db"

    # -- the log ---------------------------------------------------------------

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON line of the log, in order; anything else (a stray traceback) is skipped."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
        return records

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log records whose event is `name`."""
        return [r for r in self.log_records() if r.get("event") == name]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- processes -------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The live workers: the master's children."""
        return [pid for pid in children_of(self.pid) if is_alive(pid)]

    def wal_dir_of(self, worker_pid: int) -> Path | None:
        """The WAL directory whose LOCK file names `worker_pid` (the worker writes its pid there)."""
        for lock in sorted((self.data_dir / "wal").glob("w*/LOCK")):
            with contextlib.suppress(OSError, ValueError):
                if int(lock.read_text().strip() or "0") == worker_pid:
                    return lock.parent
        return None

    def _ready_once(self) -> bool:
        try:
            return exchange(self.port, "GET", "/ready", timeout=2.0).status == 200
        except (OSError, http.client.HTTPException):
            return False

    def wait_ready(self, timeout: float = 30.0, *, booted: int | None = None) -> None:
        """Wait until `booted` workers (all of them by default) finished replay and /ready answers 200.

        A connection reaches whichever worker accepts it, so /ready alone cannot speak for
        every worker: each worker logs `wal_replayed` just before it turns ready, and the
        count of those lines says how many did. /ready must then answer 200 three times
        in a row, on fresh connections.
        """
        expected = self.workers if booted is None else booted

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise ProcessTestError(f"gunicorn exited with {self.proc.returncode} while starting\n{self.log_tail()}")
            if len(self.events("wal_replayed")) < expected:
                return False
            return all(self._ready_once() for _ in range(3))

        wait_for(ready, timeout, f"{expected} ready worker(s)", describe=self.log_tail)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the master only (not its process group)."""
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for the master to exit; its return code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ProcessTestError(f"gunicorn did not exit within {timeout} s\n{self.log_tail()}") from None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> tuple[int, float]:
        """Signal the master and wait for it; (return code, seconds it took)."""
        started = time.monotonic()
        self.send_signal(sig)
        code = self.wait_exit(timeout)
        return code, time.monotonic() - started

    def kill9_all(self) -> list[int]:
        """`kill -9` the master and then each of its workers, and wait until all are gone; the workers' pids."""
        workers = self.worker_pids()
        # The master first, so that it cannot respawn a worker killed before it.
        os.kill(self.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        wait_for(lambda: not any(is_alive(p) for p in workers), 10, "killed workers to disappear")
        return workers

    def kill9_worker(self, pid: int) -> None:
        """`kill -9` one worker and wait until it is gone (the master stays up and respawns it)."""
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not is_alive(pid), 10, f"worker {pid} to die")

    def cleanup(self) -> None:
        """Kill whatever is left of this gunicorn (master and workers share a process group)."""
        kill_session(self.proc, 10)


def start_gunicorn(
    data_dir: Path,
    log_path: Path,
    *,
    workers: int = 2,
    port: int | None = None,
    env: dict[str, str] | None = None,
    registry: list[Gunicorn] | None = None,
) -> Gunicorn:
    """Start `gunicorn -c gunicorn.conf.py wsgi:app` from the repository, logging to `log_path`.

    It returns at once; call `wait_ready`. Pass `registry` (a fixture's list) so that the
    fixture's finalizer kills the process group whatever the test does.
    """
    port = free_port() if port is None else port
    # The service makes the data directory itself (0700); only its parent must exist.
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = start_in_session(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        log_path=log_path,
        env=service_env(data_dir, port, workers, env),
    )
    server = Gunicorn(proc=proc, port=port, data_dir=data_dir, log_path=log_path, workers=workers)
    if registry is not None:
        registry.append(server)
    return server


class Launcher:
    """Starts gunicorns (one log file each) for one test, and kills every one of them at `cleanup`.

    Without `data_dir`, each start uses `base/data`, so a restart finds the WAL the last one left.
    """

    def __init__(self, base: Path) -> None:
        self._base = base
        self._numbers = itertools.count()
        self.started: list[Gunicorn] = []

    def __call__(
        self, *, workers: int = 2, env: dict[str, str] | None = None, data_dir: Path | None = None
    ) -> Gunicorn:
        log_path = self._base / f"gunicorn-{next(self._numbers)}.log"
        data = self._base / "data" if data_dir is None else data_dir
        return start_gunicorn(data, log_path, workers=workers, env=env, registry=self.started)

    def cleanup(self) -> None:
        for server in self.started:
            server.cleanup()


# -- HTTP ------------------------------------------------------------------------


def post_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass(frozen=True)
class Response:
    """A whole response: status, headers (names lowercased) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request, on `conn` (kept open) or on a fresh connection (closed); the whole response."""
    own = conn is None
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout) if conn is None else conn
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        if own:
            connection.close()


class KeepAlive:
    """One client's keep-alive connection: opened when first needed, and opened afresh after a wire error.

    A request that fails on the wire raises (OSError or http.client.HTTPException) and
    is never resent. A response that ends the connection needs nothing here:
    http.client closes it and opens a new one for the next request.
    """

    def __init__(self, port: int, *, timeout: float = 15.0) -> None:
        self._port = port
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST `body` to `path` on the kept connection; the whole response."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(HOST, self._port, timeout=self._timeout)
        try:
            response = exchange(self._port, "POST", path, body, headers, conn=self._conn)
        except (OSError, http.client.HTTPException):
            # The connection may be left mid-exchange, where http.client refuses the next request.
            self.close()
            raise
        return response

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _answer(status: int, body: bytes) -> tuple[dict[str, Any], str]:
    """An answer's JSON object ({} if it has none) and its Ledger label ("202", "429:queue_full")."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    data: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
    label = str(status) if status in (200, 202) else f"{status}:{data.get('error', '?')}"
    return data, label


@dataclass
class Ledger:
    """What the client sent and what the service answered, keyed by the body's marker `n`.

    - `acked`: payload_id -> n, for a 202, or a 429 carrying a payload_id (durable).
    - `answered`: payload_id -> n, for every response that carried a payload_id.
    - `lost`: markers whose request got no response (connection refused, reset, killed).
    """

    sent: set[int] = field(default_factory=set)
    acked: dict[str, int] = field(default_factory=dict)
    answered: dict[str, int] = field(default_factory=dict)
    lost: set[int] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    #: n -> what became of its request ("202", "503:shutting_down", "error:ConnectionResetError").
    outcome_of: dict[int, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_sent(self, n: int) -> None:
        with self.lock:
            self.sent.add(n)

    def record_response(self, n: int, status: int, body: bytes) -> None:
        data, label = _answer(status, body)
        payload_id = data.get("payload_id")
        with self.lock:
            self.outcomes[label] += 1
            self.outcome_of[n] = label
            if isinstance(payload_id, str):
                self.answered[payload_id] = n
                if status in (202, 429):
                    self.acked[payload_id] = n

    def record_answer(self, markers: Sequence[int], status: int, body: bytes) -> tuple[str, ...]:
        """Record one answer to a single entry or a batch (markers in element order); the payload_ids it carried."""
        data, label = _answer(status, body)
        single = data.get("payload_id")
        ids = data.get("payload_ids", [single] if isinstance(single, str) else [])
        whole = isinstance(ids, list) and len(ids) == len(markers)
        with self.lock:
            for n in markers:
                self.outcomes[label] += 1
                self.outcome_of[n] = label
            if whole:
                for payload_id, n in zip(ids, markers, strict=True):
                    self.answered[payload_id] = n
                    if status in (202, 429):
                        self.acked[payload_id] = n
        return tuple(ids) if whole else ()

    def record_lost(self, n: int, exc: BaseException) -> None:
        with self.lock:
            self.lost.add(n)
            label = f"error:{type(exc).__name__}"
            self.outcomes[label] += 1
            self.outcome_of[n] = label

    @property
    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def snapshot_acked(self) -> dict[str, int]:
        with self.lock:
            return dict(self.acked)


class Writers:
    """Client threads POSTing {"n": <unique int>} over keep-alive connections, recording a Ledger.

    Each thread keeps one `http.client` connection and opens a new one after any error.
    A request that fails on the wire is recorded as lost and never resent, so each
    marker is sent at most once and a stored row can be traced to exactly one request.
    """

    def __init__(
        self, port: int, *, threads: int = 8, total: int | None = None, ledger: Ledger | None = None, first: int = 0
    ) -> None:
        self.port = port
        self.total = total
        self.ledger = ledger if ledger is not None else Ledger()
        self._threads = threads
        self._numbers = itertools.count(first)
        self._end = None if total is None else first + total
        self._numbers_lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="writer")
        self._futures: list[Future[None]] = []

    def __enter__(self) -> Writers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._futures = [self._pool.submit(self._run) for _ in range(self._threads)]

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every thread to finish its current request and stop; wait for them."""
        self._stop.set()
        self.join(timeout)

    def join(self, timeout: float = 60.0) -> None:
        """Wait for the threads (they end by themselves once `total` requests were sent)."""
        deadline = time.monotonic() + timeout
        for future in self._futures:
            future.result(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=True)

    def wait_acked(self, count: int, timeout: float = 30.0) -> None:
        wait_for(
            lambda: self.ledger.acked_count >= count,
            timeout,
            f"{count} acknowledged writes",
            describe=lambda: f"outcomes so far: {dict(self.ledger.outcomes)}",
        )

    def _next(self) -> int | None:
        with self._numbers_lock:
            n = next(self._numbers)
        return None if self._end is not None and n >= self._end else n

    def _run(self) -> None:
        headers = post_headers()
        with contextlib.closing(KeepAlive(self.port)) as client:
            while not self._stop.is_set():
                n = self._next()
                if n is None:
                    return
                self.ledger.record_sent(n)
                try:
                    response = client.post(f"/inbound/{SOURCE}", json.dumps({"n": n}).encode(), headers)
                except (OSError, http.client.HTTPException) as exc:
                    self.ledger.record_lost(n, exc)
                    # Not a synchronisation: a pause so a dead port is not hammered.
                    self._stop.wait(0.01)
                    continue
                self.ledger.record_response(n, response.status, response.body)


# -- the destination -------------------------------------------------------------


def _read(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db_path.exists():
        return []
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise


def count_rows(db_path: Path) -> dict[str, int]:
    """payload_id -> number of rows in `nexus_entries` (SELECT payload_id, count(*) GROUP BY payload_id)."""
    rows = _read(db_path, "SELECT payload_id, count(*) FROM nexus_entries GROUP BY payload_id")
    return {str(payload_id): int(n) for payload_id, n in rows}


def stored_markers(db_path: Path) -> list[tuple[str, int | None]]:
    """(payload_id, the body's "n") of every row; n is None when the payload has no integer "n"."""
    rows: list[tuple[str, int | None]] = []
    for payload_id, payload in _read(db_path, "SELECT payload_id, payload FROM nexus_entries"):
        try:
            n = json.loads(payload).get("n")
        except (ValueError, AttributeError):
            n = None
        rows.append((str(payload_id), n if isinstance(n, int) else None))
    return rows


def pg_markers(url: str) -> list[tuple[str, int | None]]:
    """`stored_markers` of the PostgreSQL database at `url`."""
    import psycopg  # here, not at the top: a gevent test must patch before psycopg is imported

    sql = b"""
        SELECT payload_id,
               CASE WHEN jsonb_typeof(payload -> 'n') = 'number' THEN (payload ->> 'n')::bigint END
        FROM nexus_entries
    """
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return [(str(pid), None if n is None else int(n)) for pid, n in conn.execute(sql).fetchall()]


def wait_delivered(db_path: Path, payload_ids: Iterable[str], timeout: float = 60.0) -> None:
    """Poll the destination until every one of `payload_ids` has a row."""
    wanted = set(payload_ids)

    def missing() -> set[str]:
        return wanted - count_rows(db_path).keys()

    wait_for(
        lambda: not missing(),
        timeout,
        f"{len(wanted)} acknowledged entries in {db_path.name}",
        describe=lambda: f"still missing: {len(missing())}",
    )


def exactly_once_problems(ledger: Ledger, db_path: Path, *, responses_may_be_lost: bool) -> list[str]:
    """Everything that breaks "each acknowledged entry stored exactly once, and nothing else stored".

    - every acknowledged payload_id has exactly one row;
    - no payload_id has more than one row, and no marker n is stored twice;
    - every row's marker was sent by the client, under the payload_id the client was told;
    - a row whose payload_id the client never saw is allowed only for a request whose
      response was lost (`responses_may_be_lost`: the process was killed mid-request).
    """
    return row_problems(ledger, stored_markers(db_path), responses_may_be_lost=responses_may_be_lost)


def assert_exactly_once(ledger: Ledger, server: Gunicorn, *, responses_may_be_lost: bool = False) -> None:
    """No `exactly_once_problems` in `server`'s SQLite destination; else the first ones, the outcomes, the log."""
    problems = exactly_once_problems(ledger, server.db_path, responses_may_be_lost=responses_may_be_lost)
    assert problems == [], (
        f"{len(problems)} problem(s), first ones: {problems[:20]}\noutcomes: {dict(ledger.outcomes)}\n"
        f"log tail:\n{server.log_tail()}"
    )


def row_problems(
    ledger: Ledger, markers: Sequence[tuple[str, int | None]], *, responses_may_be_lost: bool
) -> list[str]:
    """`exactly_once_problems` for rows read from any destination.

    `markers` holds (payload_id, the body's "n") of every row.
    """
    counts = Counter(payload_id for payload_id, _ in markers)
    problems: list[str] = []
    for payload_id, n in sorted(ledger.acked.items(), key=lambda kv: kv[1]):
        rows = counts.get(payload_id, 0)
        if rows != 1:
            problems.append(f"acknowledged {payload_id} (n={n}) has {rows} rows")
    problems.extend(
        f"{payload_id} has {rows} rows"
        for payload_id, rows in sorted(counts.items())
        if rows > 1 and payload_id not in ledger.acked
    )
    seen: dict[int, str] = {}
    for payload_id, marker in markers:
        if marker is None or marker not in ledger.sent:
            problems.append(f"row {payload_id} holds n={marker}, which the client never sent")
            continue
        if marker in seen:
            problems.append(f"n={marker} is stored twice: {seen[marker]} and {payload_id}")
        seen[marker] = payload_id
        told = ledger.answered.get(payload_id)
        if told is not None and told != marker:
            problems.append(f"row {payload_id} holds n={marker}, but the client was given that id for n={told}")
        elif told is None and not (responses_may_be_lost and marker in ledger.lost):
            problems.append(
                f"row {payload_id} (n={marker}) was stored, but its request was never acknowledged: "
                f"{ledger.outcome_of.get(marker, 'no outcome recorded')}"
            )
    return problems


# -- holding the SQLite destination ---------------------------------------------------


def wait_table(db_path: Path, timeout: float = 10.0) -> None:
    """Wait until the service has created `nexus_entries` in `db_path` (its start-up probe does)."""

    def exists() -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'nexus_entries'"
        return bool(_read(db_path, sql))

    wait_for(exists, timeout, f"nexus_entries in {db_path}")


@contextlib.contextmanager
def destination_locked(db_path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on the destination (BEGIN EXCLUSIVE) until the block ends.

    The service's writes then wait out their busy timeout and fail with "database is
    locked": the destination reads as unavailable and delivery pauses, without using
    up any entry's attempts. Readers (`count_rows`) still work, the file is in WAL mode.
    """
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


# -- /metrics ----------------------------------------------------------------------------


def scrape(port: int, *, timeout: float = 10.0) -> str:
    """The Prometheus text of /metrics, read with the admin token."""
    response = exchange(port, "GET", "/metrics", headers=admin_headers(), timeout=timeout)
    if response.status != 200:
        raise ProcessTestError(f"/metrics answered {response.status}: {response.body[:300]!r}")
    return response.body.decode()


def metric_sum(text: str, sample: str, **labels: str) -> float:
    """The sum of every sample named `sample` (e.g. "nexus_writes_accepted_total") whose labels match `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def ready(server: Gunicorn) -> Gunicorn:
    """Wait until every worker is ready and the destination table exists (the start-up probe made it)."""
    server.wait_ready()
    wait_table(server.db_path)
    return server


@contextlib.contextmanager
def poisoned(db_path: Path, marker: str) -> Iterator[None]:
    """A trigger on nexus_entries that refuses, as a constraint error, any payload holding `marker`; dropped at exit."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON nexus_entries "
            f"WHEN NEW.payload LIKE '%{marker}%' BEGIN SELECT RAISE(ABORT, 'poison'); END"
        )
        try:
            yield
        finally:
            # "Fix the destination."
            conn.execute("DROP TRIGGER IF EXISTS poison")
