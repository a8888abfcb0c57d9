"""The batch path: NDJSON batches against single entries and the raw driver, same run.

    .venv/bin/python -m bench.batch_path [--rounds 3] [--seconds 8] [--connections 64]

Each round, alternating which goes first: the service (wsgi:app under gunicorn.conf.py,
2 gevent workers, SQLite destination delivering meanwhile) flat out with wrk and
bench/post_batch.lua, once with NDJSON requests of BATCH_ENTRIES entries of about 250
bytes, once with one such entry a request (application/json), a fresh data directory
each; then the raw rate: sqlite3's executemany of the same rows into the destination's
own table with its own INSERT, TRANSACTION_ROWS rows a transaction, synchronous=FULL,
WAL journal. Entries/s accepted (202s times entries a request) and delivered (rows the
destination gained during the load), whether the backlog stayed empty; medians of the
rounds. Writes bench/results/batch_path.json and prints the medians.
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
import uuid
from pathlib import Path
from typing import Any

from nexus_gevent.destinations._sql import format_timestamp
from nexus_gevent.destinations.sqlite import _INSERT, MIGRATIONS

from .harness import ROOT, Server, cpu_seconds, gunicorn, log, parse_wrk, sqlite_rows
from .write_path import INBOUND, SERVICE_APP, GaugeSampler, catch_up, gauge_sum, wait_idle

RESULTS = ROOT / "bench" / "results"
#: Entries a batch request carries: the issue's figure.
BATCH_ENTRIES = 100
#: Bytes of each entry's JSON (post_batch.lua pads to it), newline included.
ENTRY_BYTES = 250
#: Rows a transaction of the raw-driver rate: the destination's delivery batch.
TRANSACTION_ROWS = 256
CONNECTIONS = 64


def entry_json(n: int) -> str:
    """The entry post_batch.lua sends, byte for byte (without its newline)."""
    head = f'{{"sensor":"s-{n:05d}","reading":21.5,"unit":"C","tags":["bench","batch"],"n":{n},"pad":"'
    return head + "x" * (ENTRY_BYTES - 1 - len(head) - 2) + '"}'


def load(server: Server, entries: int, *, seconds: float, connections: int) -> dict[str, Any]:
    """wrk flat out with `entries` entries a request; entries/s accepted and delivered, backlog samples."""
    db = server.data_dir / "nexus.db"
    before = sqlite_rows(db)
    pids = server.worker_pids()
    cpu = cpu_seconds(pids)
    env = {**os.environ, "NEXUS_BENCH_TOKEN": server.token, "NEXUS_BENCH_ENTRIES": str(entries)}
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    cmd += ["-s", str(ROOT / "bench" / "post_batch.lua"), server.url + INBOUND]
    with GaugeSampler(server) as gauges:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    result = parse_wrk(out)
    cpu = cpu_seconds(pids) - cpu
    delivered = sqlite_rows(db) - before
    accepted = result.statuses.get(202, 0) * entries
    shed = result.statuses.get(429, 0) * entries
    caught_up = catch_up(db, before + accepted + shed)
    row: dict[str, Any] = {
        "entries_per_request": entries,
        "seconds": result.seconds,
        "requests_per_s": result.rate(),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "socket_errors": result.errors,
        "accepted_entries_per_s": accepted / result.seconds,
        "delivered_entries_per_s": delivered / result.seconds,
        "delivery_lag_at_load_end": accepted + shed - delivered,
        "caught_up_after_s": caught_up,
        "backlog_max": max(gauges.backlog, default=0.0),
        "queue_depth_max": max(gauges.depth, default=0.0),
        "backlog_after": gauge_sum(server.metrics(), "nexus_backlog_entries"),
        "cpu_us_per_entry": cpu / max(accepted, 1) * 1e6,
        "worker_cpus_busy": cpu / result.seconds,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }
    # Sustained: nothing shed, the backlog never grew, and delivery within a second of intake.
    row["sustained"] = bool(
        shed == 0 and row["backlog_max"] == 0 and row["delivery_lag_at_load_end"] < max(1.0, accepted / result.seconds)
    )
    return row


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
            batch = [(uuid.uuid4().hex, "default", "default", None, None, now, payload, now) for payload in payloads]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, batch)
            conn.execute("COMMIT")
            rows += len(batch)
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    return {"rows": rows, "seconds": elapsed, "rows_per_s": rows / elapsed, "transaction_rows": TRANSACTION_ROWS}


def run_round(round_no: int, *, seconds: float, connections: int, workdir: Path) -> dict[str, Any]:
    """One round: batch and single-entry loads (order alternating), then the raw rate."""
    row: dict[str, Any] = {"round": round_no}
    order = [("batch", BATCH_ENTRIES), ("single", 1)]
    if round_no % 2 == 0:
        order.reverse()
    for name, entries in order:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(SERVICE_APP, Path(tmp) / "data") as server:
            row[name] = load(server, entries, seconds=seconds, connections=connections)
            wait_idle(server)
        r = row[name]
        log(
            f"round {round_no} {name}: {r['accepted_entries_per_s']:,.0f} entries/s accepted, "
            f"{r['delivered_entries_per_s']:,.0f} delivered, backlog max {r['backlog_max']:.0f}, "
            f"p99 {r['p99_ms']} ms, sustained={r['sustained']}"
        )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        row["raw_sqlite"] = raw_sqlite(seconds, Path(tmp))
    log(f"round {round_no} raw sqlite3: {row['raw_sqlite']['rows_per_s']:,.0f} rows/s")
    accepted = row["batch"]["accepted_entries_per_s"]
    row["ratios"] = {
        "batch_to_single": accepted / max(row["single"]["accepted_entries_per_s"], 1e-9),
        "batch_delivered_to_raw_sqlite": row["batch"]["delivered_entries_per_s"] / row["raw_sqlite"]["rows_per_s"],
    }
    return row


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of the figures the docs quote."""

    def median(*path: str) -> float:
        values = []
        for r in rounds:
            value: Any = r
            for key in path:
                value = value[key]
            values.append(float(value))
        return statistics.median(values)

    return {
        "batch_accepted_entries_per_s": median("batch", "accepted_entries_per_s"),
        "batch_delivered_entries_per_s": median("batch", "delivered_entries_per_s"),
        "batch_requests_per_s": median("batch", "requests_per_s"),
        "batch_p99_ms": median("batch", "p99_ms"),
        "batch_sustained_rounds": sum(bool(r["batch"]["sustained"]) for r in rounds),
        "single_accepted_entries_per_s": median("single", "accepted_entries_per_s"),
        "single_delivered_entries_per_s": median("single", "delivered_entries_per_s"),
        "single_p99_ms": median("single", "p99_ms"),
        "single_sustained_rounds": sum(bool(r["single"]["sustained"]) for r in rounds),
        "raw_sqlite_rows_per_s": median("raw_sqlite", "rows_per_s"),
        "ratio_batch_to_single": median("ratios", "batch_to_single"),
        "ratio_batch_delivered_to_raw_sqlite": median("ratios", "batch_delivered_to_raw_sqlite"),
        "rounds": len(rounds),
    }


def run(rounds: int, *, seconds: float, connections: int = CONNECTIONS, workdir: Path) -> dict[str, Any]:
    """Every round and the medians; what bench.suite stores under "batch_path"."""
    rows = [run_round(n, seconds=seconds, connections=connections, workdir=workdir) for n in range(1, rounds + 1)]
    return {
        "settings": {
            "entries_per_request": BATCH_ENTRIES,
            "entry_bytes": ENTRY_BYTES,
            "connections": connections,
            "seconds": seconds,
            "workers": 2,
            "raw_transaction_rows": TRANSACTION_ROWS,
        },
        "rounds": rows,
        "median": summary(rows),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_path.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nexus-batch-") as tmp:
        results = run(args.rounds, seconds=args.seconds, connections=args.connections, workdir=Path(tmp))
    results["command"] = "python -m bench.batch_path " + " ".join(argv if argv is not None else sys.argv[1:])
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["median"], indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
