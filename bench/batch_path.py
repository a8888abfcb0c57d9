"""The batch path, sustained: the highest rate delivered with the backlog flat, against the raw driver.

    .venv/bin/python -m bench.batch_path [--rounds 3] [--seconds 6] [--sizes 1,10,100,1000]
                                         [--postgres-url URL] [--no-postgres]

Each round, the order of its parts alternating from round to round:

- for each request size k (entries a request; NDJSON for k > 1, one JSON object for
  k = 1), the service (wsgi:app under gunicorn.conf.py, 2 gevent workers, a fresh
  SQLite destination each load) is driven by wrk (-t2 -c64, bench/post_batch.lua) flat
  out. If that load is sustained (nothing shed, the backlog gauge 0 at every sample,
  the rows delivered trailing intake by at most a quarter of a second of it when the
  load stops), it is the
  highest sustained rate. If not, a search follows: paced loads
  (bench/post_batch_rate.lua, the wrk2-like pacing of bench/post_rate.lua) bisecting
  between 0 and the flat-out intake, the first guess the rate delivered flat out; the
  highest sustained load found is the figure, with its p99;
- the same search for k = BATCH_ENTRIES against PostgreSQL (a private server from the
  installed binaries, fsync on, a fresh database each load; or --postgres-url);
- the raw driver rates with the same rows (the service's own payload ids, made by
  nexus_gevent.entry.new_payload_ids): sqlite3's executemany of a row-at-a-time INSERT
  into the destination's table (bench/_sqlite_raw.py), TRANSACTION_ROWS rows a
  transaction, synchronous=FULL, WAL journal (SQLite's default checkpoints); and
  psycopg's executemany, TRANSACTION_ROWS rows a transaction, into the destination's own
  table on the same PostgreSQL server.

Ratios are taken within a round: sustained batch / sustained single entries (both
SQLite), sustained batch / raw executemany (SQLite, PostgreSQL). Medians, min and max
over the rounds. Writes bench/results/batch_path.json (and, when run alone, the plot
bench/results/batch_sizes.png or batch_sizes.csv without matplotlib) and prints the
medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nexus_gevent.destinations._sql import format_timestamp
from nexus_gevent.destinations.sqlite import MIGRATIONS
from nexus_gevent.entry import new_payload_ids

from ._sqlite_raw import INSERT as RAW_INSERT
from .harness import ROOT, Server, cpu_seconds, gunicorn, log, parse_wrk, sqlite_rows
from .write_path import INBOUND, SERVICE_APP, GaugeSampler, gauge_sum, wait_idle

RESULTS = ROOT / "bench" / "results"
#: Entries a batch request carries: the issue's figure.
BATCH_ENTRIES = 100
#: The request sizes of the sweep (entries a request), for the plot.
SIZES = (1, 10, 100, 1000)
#: Bytes of each entry's JSON (post_batch.lua pads to it), newline included.
ENTRY_BYTES = 250
#: Rows a transaction of the raw-driver rates: the destination's delivery batch.
TRANSACTION_ROWS = 256
CONNECTIONS = 64
#: Paced loads after the flat-out one, bisecting for the highest sustained rate.
PROBES = 4
#: Delivery may trail intake by this much of a second of it when the load stops...
LAG_SECONDS = 0.25
#: ... or by what the delivery greenlets may hold at once (2 workers x 4 greenlets x 256).
IN_FLIGHT = 2 * 4 * 256
#: How long delivery may take to catch up after a load that was not sustained.
CATCH_UP_TIMEOUT = 120.0


def entry_json(n: int) -> str:
    """The entry post_batch.lua sends, byte for byte (without its newline)."""
    head = f'{{"sensor":"s-{n:05d}","reading":21.5,"unit":"C","tags":["bench","batch"],"n":{n},"pad":"'
    return head + "x" * (ENTRY_BYTES - 1 - len(head) - 2) + '"}'


# -- destinations ---------------------------------------------------------------------------


@dataclass
class Target:
    """Where a load's entries go: the service's destination URL and how to count its rows."""

    name: str
    url: str
    rows: Callable[[], int]


@contextlib.contextmanager
def sqlite_target(data_dir: Path) -> Iterator[Target]:
    db = data_dir / "nexus.db"
    yield Target("sqlite", f"sqlite:///{db}", lambda: sqlite_rows(db))


def pg_rows(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute(b"SELECT to_regclass('nexus_entries')").fetchone() == (None,):
            return 0
        row = conn.execute(b"SELECT count(*) FROM nexus_entries").fetchone()
    return int(row[0]) if row is not None else 0


# -- one load -------------------------------------------------------------------------------


def load(
    server: Server, target: Target, entries: int, *, seconds: float, connections: int, rate: float | None
) -> dict[str, Any]:
    """wrk with `entries` entries a request, flat out (rate None) or paced at `rate` entries/s."""
    before = target.rows()
    pids = server.worker_pids()
    cpu = cpu_seconds(pids)
    env = {**os.environ, "NEXUS_BENCH_TOKEN": server.token, "NEXUS_BENCH_ENTRIES": str(entries)}
    script = "post_batch.lua"
    if rate is not None:
        script = "post_batch_rate.lua"
        env["NEXUS_BENCH_RATE"] = repr(rate / entries)
        env["NEXUS_BENCH_CONNECTIONS"] = str(connections)
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    cmd += ["-s", str(ROOT / "bench" / script), server.url + INBOUND]
    with GaugeSampler(server) as gauges:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    result = parse_wrk(out)
    cpu = cpu_seconds(pids) - cpu
    delivered = target.rows() - before
    accepted = result.statuses.get(202, 0) * entries
    shed = result.statuses.get(429, 0) * entries
    row: dict[str, Any] = {
        "entries_per_request": entries,
        "offered_entries_per_s": rate,
        "seconds": result.seconds,
        "requests_per_s": result.rate(),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "socket_errors": result.errors,
        "accepted_entries_per_s": accepted / result.seconds,
        "durable_entries_per_s": (accepted + shed) / result.seconds,
        "delivered_entries_per_s": delivered / result.seconds,
        "delivery_lag_at_load_end": accepted + shed - delivered,
        "backlog_max": max(gauges.backlog, default=0.0),
        "queue_depth_max": max(gauges.depth, default=0.0),
        "cpu_us_per_entry": cpu / max(accepted + shed, 1) * 1e6,
        "worker_cpus_busy": cpu / result.seconds,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }
    # Sustained: nothing shed, the backlog never grew, and delivery behind intake by no
    # more than a quarter of a second of it (or what the delivery greenlets hold in flight).
    row["sustained"] = bool(
        shed == 0
        and accepted > 0
        and row["backlog_max"] == 0
        and row["delivery_lag_at_load_end"] <= max(IN_FLIGHT, LAG_SECONDS * accepted / result.seconds)
    )
    deadline = time.monotonic() + CATCH_UP_TIMEOUT
    while target.rows() - before < accepted + shed and time.monotonic() < deadline:
        time.sleep(0.2)
    row["backlog_after"] = gauge_sum(server.metrics(), "nexus_backlog_entries")
    return row


#: wrk sends one body over and over: with the shed resend window on, every request after
#: the first durable 429 would be answered 200 duplicate and store nothing.
SERVICE_ENV = {"NEXUS_SHED_RESEND_WINDOW": "0"}


@contextlib.contextmanager
def service(kind: str, workdir: Path, pg: Any) -> Iterator[tuple[Server, Target]]:
    """A fresh service and destination: SQLite in a fresh data directory, or a fresh PostgreSQL database."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        data_dir = Path(tmp) / "data"
        if kind == "sqlite":
            with sqlite_target(data_dir) as target, gunicorn(SERVICE_APP, data_dir, env=SERVICE_ENV) as server:
                yield server, target
            return
        with pg.fresh() as url:
            target = Target("postgres", url, lambda: pg_rows(url))
            env = {**SERVICE_ENV, "NEXUS_DESTINATION_URL": url}
            with gunicorn(SERVICE_APP, data_dir, env=env) as server:
                yield server, target


def one_load(
    kind: str, entries: int, *, seconds: float, connections: int, rate: float | None, workdir: Path, pg: Any
) -> dict[str, Any]:
    with service(kind, workdir, pg) as (server, target):
        row = load(server, target, entries, seconds=seconds, connections=connections, rate=rate)
        wait_idle(server)
    pace = "flat out" if rate is None else f"paced {rate:,.0f}/s"
    log(
        f"  {kind} x{entries} {pace}: {row['accepted_entries_per_s']:,.0f} accepted, "
        f"{row['delivered_entries_per_s']:,.0f} delivered/s, lag {row['delivery_lag_at_load_end']}, "
        f"backlog max {row['backlog_max']:.0f}, p99 {row['p99_ms']} ms, sustained={row['sustained']}"
    )
    return row


def sustained(
    kind: str, entries: int, *, seconds: float, connections: int, probes: int, workdir: Path, pg: Any
) -> dict[str, Any]:
    """The highest sustained rate of `entries` entries a request: flat out if that holds, else a bisection."""
    flat = one_load(kind, entries, seconds=seconds, connections=connections, rate=None, workdir=workdir, pg=pg)
    loads = [flat]
    best: dict[str, Any] | None = flat if flat["sustained"] else None
    if best is None:
        low, high = 0.0, flat["durable_entries_per_s"]
        rate = min(max(flat["delivered_entries_per_s"], high / 8), high * 0.9)
        for _ in range(probes):
            row = one_load(kind, entries, seconds=seconds, connections=connections, rate=rate, workdir=workdir, pg=pg)
            loads.append(row)
            if row["sustained"]:
                low = rate
                if best is None or row["accepted_entries_per_s"] > best["accepted_entries_per_s"]:
                    best = row
            else:
                high = rate
            rate = (low + high) / 2
    return {
        "entries_per_request": entries,
        "destination": kind,
        "sustained_entries_per_s": 0.0 if best is None else best["accepted_entries_per_s"],
        "sustained_p99_ms": None if best is None else best["p99_ms"],
        "flat_out": flat,
        "loads": loads,
    }


# -- the raw drivers ------------------------------------------------------------------------


def raw_sqlite(seconds: float, workdir: Path) -> dict[str, Any]:
    """sqlite3 executemany of the same rows into the destination's table, TRANSACTION_ROWS a transaction."""
    db = workdir / "raw.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        now = format_timestamp(time.time())
        payloads = [entry_json(n) for n in range(TRANSACTION_ROWS)]
        rows = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            ids = new_payload_ids(len(payloads))
            batch = [
                (pid, "default", "default", None, None, now, payload, now)
                for pid, payload in zip(ids, payloads, strict=True)
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(RAW_INSERT, batch)
            conn.execute("COMMIT")
            rows += len(batch)
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "transaction_rows": TRANSACTION_ROWS}


_PG_COLUMNS = "payload_id, source, destination, subject, idempotency_key, received_at, delivered_at, payload"
_PG_EXECUTEMANY = (
    f"INSERT INTO nexus_entries ({_PG_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, now(), %s::jsonb)"
    " ON CONFLICT (payload_id) DO NOTHING"
)


def raw_pg(seconds: float, url: str) -> dict[str, Any]:
    """psycopg executemany of the same rows into the destination's table, TRANSACTION_ROWS a transaction."""
    import psycopg

    from nexus_gevent.destinations import postgres as pg_dest

    payloads = [entry_json(n) for n in range(TRANSACTION_ROWS)]
    with psycopg.connect(url, autocommit=True) as conn:
        pg_dest.migrate(conn)
        rows = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            now = datetime.now(UTC)
            ids = new_payload_ids(len(payloads))
            batch = [(pid, "default", "default", None, None, now, p) for pid, p in zip(ids, payloads, strict=True)]
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_PG_EXECUTEMANY.encode(), batch)
            rows += len(batch)
        elapsed = time.monotonic() - started
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "transaction_rows": TRANSACTION_ROWS}


# -- rounds ---------------------------------------------------------------------------------


def run_round(
    round_no: int,
    *,
    sizes: tuple[int, ...],
    seconds: float,
    connections: int,
    probes: int,
    workdir: Path,
    pg: Any,
) -> dict[str, Any]:
    """One round: every request size against SQLite, the batch against PostgreSQL, the raw rates."""
    row: dict[str, Any] = {"round": round_no, "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    parts: list[tuple[str, Callable[[], Any]]] = []

    def search(kind: str, entries: int) -> Callable[[], dict[str, Any]]:
        return lambda: sustained(
            kind, entries, seconds=seconds, connections=connections, probes=probes, workdir=workdir, pg=pg
        )

    parts += [(f"sqlite_{k}", search("sqlite", k)) for k in sizes]
    parts.append(("raw_sqlite", lambda: raw_sqlite(seconds, workdir)))
    if pg is not None:
        parts.append((f"postgres_{BATCH_ENTRIES}", search("postgres", BATCH_ENTRIES)))

        def raw_postgres() -> dict[str, Any]:
            with pg.fresh() as url:
                return raw_pg(seconds, url)

        parts.append(("raw_postgres", raw_postgres))
    if round_no % 2 == 0:
        parts.reverse()
    for name, part in parts:
        log(f"round {round_no}: {name}")
        row[name] = part()
        figure = row[name].get("sustained_entries_per_s", row[name].get("rows_per_s"))
        log(f"round {round_no} {name}: {figure:,.0f} entries/s")
    batch = row.get(f"sqlite_{BATCH_ENTRIES}")
    ratios: dict[str, float] = {}
    if batch is not None:
        if "sqlite_1" in row:
            ratios["batch_to_single"] = batch["sustained_entries_per_s"] / max(
                row["sqlite_1"]["sustained_entries_per_s"], 1e-9
            )
        ratios["batch_to_raw_sqlite"] = batch["sustained_entries_per_s"] / row["raw_sqlite"]["rows_per_s"]
    if pg is not None:
        ratios["batch_to_raw_postgres"] = (
            row[f"postgres_{BATCH_ENTRIES}"]["sustained_entries_per_s"] / row["raw_postgres"]["rows_per_s"]
        )
    row["ratios"] = ratios
    row["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return row


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summary(rounds: list[dict[str, Any]], sizes: tuple[int, ...]) -> dict[str, Any]:
    """Median, min and max over the rounds of every figure the docs quote."""
    out: dict[str, Any] = {"rounds": len(rounds)}
    for name in rounds[0]["ratios"]:
        out[f"ratio_{name}"] = spread([r["ratios"][name] for r in rounds])
    keys = [f"sqlite_{k}" for k in sizes]
    if f"postgres_{BATCH_ENTRIES}" in rounds[0]:
        keys.append(f"postgres_{BATCH_ENTRIES}")
    for key in keys:
        out[key] = {
            "sustained_entries_per_s": spread([r[key]["sustained_entries_per_s"] for r in rounds]),
            "sustained_p99_ms": spread([r[key]["sustained_p99_ms"] or 0.0 for r in rounds]),
            "flat_out_durable_entries_per_s": spread([r[key]["flat_out"]["durable_entries_per_s"] for r in rounds]),
            "flat_out_delivered_entries_per_s": spread([r[key]["flat_out"]["delivered_entries_per_s"] for r in rounds]),
            "flat_out_sustained_rounds": sum(bool(r[key]["flat_out"]["sustained"]) for r in rounds),
        }
    for key in ("raw_sqlite", "raw_postgres"):
        if key in rounds[0]:
            out[key] = {"rows_per_s": spread([r[key]["rows_per_s"] for r in rounds])}
    return out


def run(
    rounds: int,
    *,
    seconds: float,
    connections: int = CONNECTIONS,
    sizes: tuple[int, ...] = SIZES,
    probes: int = PROBES,
    postgres: bool = True,
    postgres_url: str | None = None,
    workdir: Path,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Every round and the medians; what bench.suite stores under "batch_path".

    With `partial`, the rounds done so far are written there after each round, so a run
    cut short (a private PostgreSQL that died, for one) keeps its finished rounds.
    """
    pg = None
    if postgres:
        from .delivery import PgDatabases

        pg = PgDatabases(postgres_url, fsync=True)
    try:
        pg_settings = {"kind": pg.kind, **pg.settings()} if pg is not None else None
        rows: list[dict[str, Any]] = []
        for n in range(1, rounds + 1):
            rows.append(
                run_round(
                    n, sizes=sizes, seconds=seconds, connections=connections, probes=probes, workdir=workdir, pg=pg
                )
            )
            if partial is not None:
                partial.write_text(json.dumps({"rounds": rows}, indent=2) + "\n")
    finally:
        if pg is not None:
            pg.close()
    return {
        "settings": {
            "entries_per_request": BATCH_ENTRIES,
            "sizes": list(sizes),
            "entry_bytes": ENTRY_BYTES,
            "connections": connections,
            "seconds": seconds,
            "probes": probes,
            "workers": 2,
            "raw_transaction_rows": TRANSACTION_ROWS,
            "postgres_server": pg_settings,
        },
        "rounds": rows,
        "median": summary(rows, sizes),
    }


def size_curve(results: dict[str, Any]) -> list[dict[str, float]]:
    """The plot's points: per request size, the median sustained entries/s and its p99."""
    median = results["median"]
    points = []
    for k in results["settings"]["sizes"]:
        figures = median.get(f"sqlite_{k}")
        if figures is not None:
            points.append(
                {
                    "entries_per_request": k,
                    "sustained_entries_per_s": figures["sustained_entries_per_s"]["median"],
                    "sustained_p99_ms": figures["sustained_p99_ms"]["median"],
                    "flat_out_durable_entries_per_s": figures["flat_out_durable_entries_per_s"]["median"],
                }
            )
    return points


def write_curve(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """batch_sizes.csv always; batch_sizes.png too when matplotlib is installed."""
    points = size_curve(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "batch_sizes.csv"
    lines = ["entries_per_request,sustained_entries_per_s,sustained_p99_ms,flat_out_durable_entries_per_s"]
    lines += [
        f"{p['entries_per_request']},{p['sustained_entries_per_s']:.0f},{p['sustained_p99_ms']},"
        f"{p['flat_out_durable_entries_per_s']:.0f}"
        for p in points
    ]
    csv.write_text("\n".join(lines) + "\n")
    written = [csv]
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return written
    fig, left = plt.subplots(figsize=(7, 4.5))
    xs = [p["entries_per_request"] for p in points]
    left.plot(xs, [p["sustained_entries_per_s"] for p in points], "o-", color="tab:blue", label="sustained entries/s")
    left.plot(
        xs,
        [p["flat_out_durable_entries_per_s"] for p in points],
        "s--",
        color="tab:blue",
        alpha=0.5,
        label="flat out, made durable (entries/s)",
    )
    raw = results["median"].get("raw_sqlite")
    if raw is not None:
        left.axhline(raw["rows_per_s"]["median"], color="grey", linestyle=":", label="raw sqlite3 executemany")
    left.set_xscale("log")
    left.set_xlabel("entries per request")
    left.set_ylabel("entries/s")
    right = left.twinx()
    right.plot(xs, [p["sustained_p99_ms"] for p in points], "^-", color="tab:red", label="p99 at that rate (ms)")
    right.set_ylabel("p99 (ms)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, loc="upper left", fontsize=8)
    left.set_title("Sustained rate by request size (SQLite, 2 workers; median of rounds)")
    fig.tight_layout()
    png = out_dir / "batch_sizes.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    written.append(png)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--probes", type=int, default=PROBES)
    parser.add_argument("--sizes", default=",".join(str(k) for k in SIZES))
    parser.add_argument("--postgres-url", default=None)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_path.json")
    args = parser.parse_args(argv)
    sizes = tuple(int(k) for k in args.sizes.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nexus-batch-") as tmp:
        results = run(
            args.rounds,
            seconds=args.seconds,
            connections=args.connections,
            sizes=sizes,
            probes=args.probes,
            postgres=not args.no_postgres,
            postgres_url=args.postgres_url,
            workdir=Path(tmp),
            partial=args.out.with_suffix(".partial.json"),
        )
    results["command"] = "python -m bench.batch_path " + " ".join(argv if argv is not None else sys.argv[1:])
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    write_curve(results, args.out.parent)
    print(json.dumps(results["median"], indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
