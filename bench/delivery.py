"""Delivery rate from a WAL backlog, against the raw driver, for SQLite and PostgreSQL, in one run.

    .venv/bin/python -m bench.delivery [--entries 100000] [--rounds 3] [--postgres-url URL]

Each round, for each destination:

- **service**: N entries are written straight into a fresh data dir's WAL with the real
  `Wal` (stop-the-world prefill, no HTTP). Then one worker's `Service` is started on that
  data dir, in a child process patched as a gunicorn gevent worker is
  (`bench/_delivery_service.py`), with the default settings (queue of 10,000, 4 delivery
  greenlets): replay puts 10,000 entries in the queue, the rest waits in the backlog and is
  fed as room appears. The time is from just before `Service.start()` to the `delivered_at`
  of the last row (the destination's own clock, same machine), so the polling that notices
  the end costs nothing; replay is included, and reported apart.
- **raw**: the same N rows inserted by the driver alone, 256 per transaction, into the same
  `nexus_entries` table (created by the destination's own migration):
  - SQLite: `executemany` of a row-at-a-time INSERT into the destination's table
    (bench/_sqlite_raw.py), WAL mode, `synchronous=FULL`;
  - PostgreSQL: `executemany` (psycopg pipelines it), plus for reference `COPY` (which
    cannot skip a known payload_id) and the destination's own unnest INSERT under its
    advisory write lock (the service's SQL without the service).

Without --postgres-url, a private server is started with tests/support/postgres.py's
`PostgresServer` (fsync on unless --pg-fsync off, so a commit costs what it would in
production). With --postgres-url, the URL must be allowed to CREATE DATABASE: every run gets
a fresh database, dropped afterwards.

Prints the JSON summary (medians, min, max in entries/s, and service/raw ratios) and writes
bench/results/delivery.json and bench/results/delivery.md. bench/suite.py calls `run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from nexus_gevent.datadir import WAL_DIRNAME
from nexus_gevent.destinations import sqlite as sqlite_dest
from nexus_gevent.destinations._sql import format_timestamp
from nexus_gevent.entry import Entry, new_payload_id
from nexus_gevent.logs import configure_logging, get_logger
from nexus_gevent.wal import Wal, claim

from ._sqlite_raw import INSERT as RAW_INSERT
from .harness import log

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DESTINATION = "default"
SOURCE = "default"
#: Rows per transaction of the raw runs: the service's batch size (queue.DEFAULT_BATCH_MAX).
BATCH = 256
#: Entries per WAL append during the prefill (one write + fdatasync each).
PREFILL_CHUNK = 2000
#: How often the end of a service run is looked for; it does not change the measured time.
POLL_INTERVAL = 0.2


# -- the entries ------------------------------------------------------------------------


def make_entries(n: int) -> list[Entry]:
    """N entries with fresh payload_ids and a payload of about 150 bytes, like a small event."""
    now = time.time()
    return [
        Entry(
            payload_id=new_payload_id(),
            source=SOURCE,
            destination=DESTINATION,
            payload=orjson.dumps(
                {
                    "n": i,
                    "device": f"sensor-{i % 1000:04d}",
                    "reading": round(20 + (i % 97) / 8, 3),
                    "unit": "celsius",
                    "tags": ["bench", "delivery"],
                    "note": "prefilled straight into the WAL",
                }
            ),
            received_at=now + i * 1e-6,
        )
        for i in range(n)
    ]


def chunks(items: Sequence[Entry], size: int) -> Iterator[Sequence[Entry]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the service --------------------------------------------------------------------------


def prefill(data_dir: Path, entries: Sequence[Entry]) -> float:
    """Append every entry to a WAL directory of `data_dir`, as the service would have; the seconds it took."""
    started = time.perf_counter()
    lock = claim(data_dir / WAL_DIRNAME)
    wal = Wal(lock.path, logger=get_logger("bench"))
    try:
        wal.start()
        for chunk in chunks(entries, PREFILL_CHUNK):
            wal.append_many(chunk)
    finally:
        wal.close()
        lock.close()
    return time.perf_counter() - started


class Child:
    """The service child process: its JSON lines, read by a thread so every wait has a deadline."""

    def __init__(self, data_dir: Path, url: str, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "PROMETHEUS_MULTIPROC_DIR"))}
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._delivery_service", str(data_dir), url],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def next_event(self, name: str, deadline: float) -> dict[str, Any]:
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {name!r} from the service child in time") from None
            if line is None:
                raise RuntimeError(f"the service child exited before {name!r} (code {self.proc.wait()})")
            if line.get("event") == name:
                return line

    def stop(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        return self.next_event("stopped", deadline)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._log.close()


def service_run(
    entries: Sequence[Entry],
    url: str,
    workdir: Path,
    progress: Callable[[], tuple[int, float | None, float | None]],
    timeout: float,
) -> dict[str, float]:
    """Prefill, start the service, wait for N rows; the timings of the run.

    `progress` returns (rows, first delivered_at, last delivered_at) of the destination.
    """
    data_dir = workdir / "data"
    prefill_seconds = prefill(data_dir, entries)
    deadline = time.monotonic() + timeout
    child = Child(data_dir, url, workdir / "service.log")
    try:
        t0 = float(child.next_event("started", deadline)["t0"])
        rows = 0
        while rows < len(entries):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {rows} of {len(entries)} rows after {timeout} s; see {workdir}/service.log")
            time.sleep(POLL_INTERVAL)
            rows = progress()[0]
        ready = child.next_event("ready", deadline)
        child.stop(deadline)
    finally:
        child.close()
    rows, first, last = progress()
    assert rows == len(entries), rows
    assert first is not None
    assert last is not None
    seconds = last - t0
    return {
        "entries_per_s": len(entries) / seconds,
        "seconds": seconds,
        "prefill_seconds": prefill_seconds,
        "ready_after": float(ready["ready_after"]),
        "replay_seconds": float(ready["replay_seconds"]),
        "first_row_after": first - t0,
        # From the first row to the last: the delivery pace without start-up and replay.
        "steady_entries_per_s": (len(entries) - 1) / (last - first) if last > first else 0.0,
    }


# -- SQLite ---------------------------------------------------------------------------------


def sqlite_progress(path: Path) -> Callable[[], tuple[int, float | None, float | None]]:
    def parse(value: str | None) -> float | None:
        if value is None:
            return None
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()

    def progress() -> tuple[int, float | None, float | None]:
        if not path.exists():
            return 0, None, None
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
            try:
                count, first, last = conn.execute(
                    "SELECT count(*), min(delivered_at), max(delivered_at) FROM nexus_entries"
                ).fetchone()
            except sqlite3.OperationalError:
                return 0, None, None  # no table yet
        return int(count), parse(first), parse(last)

    return progress


def sqlite_service(entries: Sequence[Entry], workdir: Path, timeout: float) -> dict[str, float]:
    db = workdir / "data" / "nexus.db"
    return service_run(entries, f"sqlite:///{db}", workdir, sqlite_progress(db), timeout)


def sqlite_raw(entries: Sequence[Entry], workdir: Path) -> dict[str, float]:
    """executemany of bench/_sqlite_raw.py's INSERT, 256 rows per BEGIN IMMEDIATE/COMMIT, WAL + synchronous=FULL."""
    path = workdir / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        sqlite_dest.migrate(conn)
        started = time.perf_counter()
        for chunk in chunks(entries, BATCH):
            conn.execute("BEGIN IMMEDIATE")
            delivered_at = format_timestamp(time.time())
            conn.executemany(
                RAW_INSERT,
                [
                    (
                        e.payload_id,
                        e.source,
                        DESTINATION,
                        e.subject,
                        e.idempotency_key,
                        format_timestamp(e.received_at),
                        e.payload.decode("utf-8"),
                        delivered_at,
                    )
                    for e in chunk
                ],
            )
            conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        count = conn.execute("SELECT count(*) FROM nexus_entries").fetchone()[0]
    finally:
        conn.close()
    assert count == len(entries), count
    return {"entries_per_s": len(entries) / seconds, "seconds": seconds}


# -- PostgreSQL ------------------------------------------------------------------------------


class PgDatabases:
    """Fresh databases on one server: the private one started here, or the one of --postgres-url."""

    def __init__(self, url: str | None, fsync: bool) -> None:
        from tests.support import postgres as support

        if url is not None:
            self.server = support.PostgresServer.external(url)
            self.kind = "external"
        else:
            bin_dir = support.find_bin_dir()
            if bin_dir is None:
                raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl) found; pass --postgres-url")
            if fsync:
                # The test settings turn fsync off; a benchmark of durable commits wants it on.
                support.FAST_SETTINGS = ("fsync=on", "full_page_writes=on")
            self.server = support.PostgresServer.private(bin_dir)
            self.kind = "private"

    @contextlib.contextmanager
    def fresh(self) -> Iterator[str]:
        name = self.server.create_database()
        try:
            yield self.server.url(name)
        finally:
            self.server.drop_database(name)

    def settings(self) -> dict[str, str]:
        import psycopg

        with psycopg.connect(self.server.url(), autocommit=True) as conn:
            shown = {}
            for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes"):
                row = conn.execute(f"SHOW {name}".encode()).fetchone()
                shown[name] = str(row[0]) if row is not None else "?"
        return shown

    def close(self) -> None:
        self.server.destroy()


def pg_progress(url: str) -> Callable[[], tuple[int, float | None, float | None]]:
    import psycopg

    def progress() -> tuple[int, float | None, float | None]:
        with psycopg.connect(url, autocommit=True) as conn:
            if conn.execute(b"SELECT to_regclass('nexus_entries')").fetchone() == (None,):
                return 0, None, None
            row = conn.execute(
                b"SELECT count(*), extract(epoch FROM min(delivered_at)), extract(epoch FROM max(delivered_at))"
                b" FROM nexus_entries"
            ).fetchone()
        assert row is not None
        count, first, last = row
        return int(count), None if first is None else float(first), None if last is None else float(last)

    return progress


def pg_service(entries: Sequence[Entry], url: str, workdir: Path, timeout: float) -> dict[str, float]:
    return service_run(entries, url, workdir, pg_progress(url), timeout)


_PG_COLUMNS = "payload_id, source, destination, subject, idempotency_key, received_at, delivered_at, payload"
_PG_EXECUTEMANY = (
    f"INSERT INTO nexus_entries ({_PG_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, now(), %s::jsonb)"
    " ON CONFLICT (payload_id) DO NOTHING"
)
_PG_COPY = f"COPY nexus_entries ({_PG_COLUMNS}) FROM STDIN"


def pg_raw(entries: Sequence[Entry], url: str, method: str) -> dict[str, float]:
    """The same rows, 256 per transaction, by `method`: executemany, copy or unnest (the service's SQL)."""
    import psycopg

    from nexus_gevent.destinations import postgres as pg_dest

    with psycopg.connect(url, autocommit=True) as conn:
        pg_dest.migrate(conn)
        started = time.perf_counter()
        for chunk in chunks(entries, BATCH):
            received = [datetime.fromtimestamp(e.received_at, UTC) for e in chunk]
            with conn.transaction(), conn.cursor() as cur:
                if method == "executemany":
                    cur.executemany(
                        _PG_EXECUTEMANY.encode(),
                        [
                            (e.payload_id, e.source, DESTINATION, e.subject, e.idempotency_key, r, e.payload.decode())
                            for e, r in zip(chunk, received, strict=True)
                        ],
                    )
                elif method == "copy":
                    now = datetime.now(UTC)
                    with cur.copy(_PG_COPY.encode()) as copy:
                        for e, r in zip(chunk, received, strict=True):
                            copy.write_row(
                                (
                                    e.payload_id,
                                    e.source,
                                    DESTINATION,
                                    e.subject,
                                    e.idempotency_key,
                                    r,
                                    now,
                                    e.payload.decode(),
                                )
                            )
                elif method == "unnest":
                    cur.execute(b"SELECT pg_advisory_xact_lock(%s)", (pg_dest._WRITE_LOCK_KEY,))
                    cur.execute(
                        pg_dest._INSERT.encode(),
                        (
                            DESTINATION,
                            [e.payload_id for e in chunk],
                            [e.source for e in chunk],
                            [e.subject for e in chunk],
                            [e.idempotency_key for e in chunk],
                            received,
                            [e.payload.decode("utf-8") for e in chunk],
                        ),
                    )
                else:
                    raise ValueError(method)
        seconds = time.perf_counter() - started
        row = conn.execute(b"SELECT count(*) FROM nexus_entries").fetchone()
    assert row is not None
    assert row[0] == len(entries), row
    return {"entries_per_s": len(entries) / seconds, "seconds": seconds}


# -- the run ----------------------------------------------------------------------------------


def spread(runs: list[dict[str, float]]) -> dict[str, Any]:
    rates = [r["entries_per_s"] for r in runs]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "rounds": runs,
    }


def spread_of(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Delivery from a WAL backlog: {report['entries']:,} entries, {report['rounds']} rounds",
        "",
        (
            f"Machine: {report['machine']['cpus']} CPUs, Python {report['machine']['python']}, "
            f"SQLite {report['machine']['sqlite']} on {report['machine']['workdir_filesystem']}, "
            f"PostgreSQL {report['postgres_server']['server_version']} "
            f"({report['postgres_server']['kind']}, fsync={report['postgres_server']['fsync']}). "
            "Entries/s; service = one worker's Service from start (replay included) to the last row."
        ),
        "",
        "| destination | run | median | min | max | service / this (medians) | per round: median (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dest in ("sqlite", "postgres"):
        service = report[dest]["service"]["median"]
        for name, data in report[dest].items():
            if not isinstance(data, dict) or "median" not in data:
                continue
            ratio = per_round = ""
            if name != "service":
                ratio = f"{service / data['median']:.2f}"
                r = report[dest]["ratio_service_to_raw_per_round"][name]
                per_round = f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
            lines.append(
                f"| {dest} | {name} | {data['median']:,.0f} | {data['min']:,.0f} | {data['max']:,.0f} "
                f"| {ratio} | {per_round} |"
            )
    lines += [
        "",
        "Service detail (medians): "
        + "; ".join(
            f"{dest}: replay {report[dest]['service_detail']['replay_seconds']:.2f} s, "
            f"first row after {report[dest]['service_detail']['first_row_after']:.2f} s, "
            f"steady {report[dest]['service_detail']['steady_entries_per_s']:,.0f}/s"
            for dest in ("sqlite", "postgres")
        ),
        "",
    ]
    return "\n".join(lines)


def filesystem(path: Path) -> str:
    """The type of the file system holding `path` (fsync costs differ by orders of magnitude)."""
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def run(
    entries: int,
    rounds: int,
    *,
    postgres_url: str | None = None,
    pg_fsync: bool = True,
    timeout: float = 300.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Every run of the module docstring, `rounds` times, for N `entries`; the report (no files written)."""
    pg = PgDatabases(postgres_url, fsync=pg_fsync)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        "sqlite": {"service": [], "raw_executemany": []},
        "postgres": {"service": [], "raw_executemany": [], "raw_copy": [], "raw_unnest": []},
    }
    try:
        pg_settings = {"kind": pg.kind, **pg.settings()}
        for round_no in range(1, rounds + 1):
            batch = make_entries(entries)
            with tempfile.TemporaryDirectory(prefix="nexus-bench-", dir=workdir) as tmp:
                base = Path(tmp)

                def record(dest: str, name: str, result: dict[str, float], round_no: int = round_no) -> None:
                    runs[dest][name].append(result)
                    log(
                        f"round {round_no} {dest} {name}: {result['entries_per_s']:,.0f} entries/s "
                        f"({result['seconds']:.2f} s)"
                    )

                (base / "sqlite-service").mkdir()
                record("sqlite", "service", sqlite_service(batch, base / "sqlite-service", timeout))
                record("sqlite", "raw_executemany", sqlite_raw(batch, base))
                (base / "pg-service").mkdir()
                with pg.fresh() as url:
                    record("postgres", "service", pg_service(batch, url, base / "pg-service", timeout))
                for method in ("executemany", "copy", "unnest"):
                    with pg.fresh() as url:
                        record("postgres", f"raw_{method}", pg_raw(batch, url, method))
    finally:
        pg.close()

    report: dict[str, Any] = {
        "entries": entries,
        "rounds": rounds,
        "batch": BATCH,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version,
            "workdir_filesystem": filesystem(workdir or Path(tempfile.gettempdir())),
        },
        "postgres_server": pg_settings,
    }
    for dest, by_name in runs.items():
        summary: dict[str, Any] = {name: spread(results) for name, results in by_name.items()}
        service = summary["service"]["median"]
        # service / raw as a ratio of medians, and round by round (the two ran minutes apart
        # at most, so a machine shared with other work disturbs the per-round ratio less).
        summary["ratio_service_to_raw"] = {
            name: service / summary[name]["median"] for name in by_name if name != "service"
        }
        summary["ratio_service_to_raw_per_round"] = {
            name: spread_of(
                [
                    s["entries_per_s"] / r["entries_per_s"]
                    for s, r in zip(by_name["service"], by_name[name], strict=True)
                ]
            )
            for name in by_name
            if name != "service"
        }
        summary["service_detail"] = {
            key: statistics.median(r[key] for r in by_name["service"])
            for key in ("replay_seconds", "ready_after", "first_row_after", "steady_entries_per_s", "prefill_seconds")
        }
        report[dest] = summary
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres-url", default=None, help="an admin URL allowed to CREATE DATABASE")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on", help="fsync of the private server")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one service run may take")
    parser.add_argument("--workdir", type=Path, default=None, help="where data dirs go (default: a temp dir)")
    args = parser.parse_args()
    configure_logging("WARNING", json=True, stream=sys.stderr)
    report = run(
        args.entries,
        args.rounds,
        postgres_url=args.postgres_url,
        pg_fsync=args.pg_fsync == "on",
        timeout=args.timeout,
        workdir=args.workdir,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delivery.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "delivery.md").write_text(markdown(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
