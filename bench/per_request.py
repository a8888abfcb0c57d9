"""What one request costs, bare app against the service, measured two ways that load on the machine moves less.

    .venv/bin/python -m bench.per_request [--rounds 3] [--requests 30000] [--seconds 8]

- in process: the WSGI app called by 64 greenlets, no server and no sockets
  (bench/_inproc_app.py, a child process per run): CPU time per request, all threads;
- under gunicorn at saturation (wrk -t2 -c64, as bench.write_path): per request, the
  workers' CPU time, context switches and syscalls from `perf stat` (skipped when perf
  is missing or not permitted);
- SQLite with the destination's own schema and INSERT, 40-row transactions (the
  service's commit size at saturation): rows/s, CPU, bytes and write calls per row with
  wholly random payload ids against the service's time-ordered ones (`new_payload_id`).

Each round runs the bare app and the service back to back (alternating which goes
first); medians, min and max over the rounds. Prints JSON; writes
bench/results/per_request.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nexus_gevent.destinations.sqlite import MIGRATIONS
from nexus_gevent.entry import new_payload_id

from ._sqlite_raw import INSERT as RAW_INSERT
from .harness import ROOT, gunicorn, log, wrk
from .write_path import BARE_APP, INBOUND, SERVICE_APP

RESULTS = ROOT / "bench" / "results" / "per_request.json"
PERF_EVENTS = "task-clock,context-switches,raw_syscalls:sys_enter"
#: perf's event name -> the key reported.
PERF_KEYS = {"task-clock": "cpu_ms", "context-switches": "context_switches", "raw_syscalls:sys_enter": "syscalls"}


def in_process(app: str, requests: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench._inproc_app", app, str(requests)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600).stdout
    row: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return row


def perf_stat(app: str, seconds: float) -> dict[str, Any] | None:
    """perf stat over both workers during `seconds` of a saturating wrk load; counts per request."""
    if shutil.which("perf") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp, gunicorn(app, Path(tmp) / "data") as server:
        result: dict[str, Any] = {}
        load = threading.Thread(
            target=lambda: result.setdefault("wrk", wrk(server.url + INBOUND, token=server.token, seconds=seconds + 2))
        )
        load.start()
        time.sleep(1)
        pids = ",".join(str(p) for p in server.worker_pids())
        cmd = ["perf", "stat", "-x,", "-e", PERF_EVENTS, "-p", pids, "--", "sleep", str(seconds)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=seconds + 60)
        load.join()
    if done.returncode != 0:
        log(f"perf stat failed: {done.stderr.strip()[:200]}")
        return None
    requests = result["wrk"].rate() * seconds
    row: dict[str, Any] = {"requests_per_s": result["wrk"].rate()}
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in PERF_KEYS and fields[0] not in ("<not counted>", "<not supported>"):
            row[PERF_KEYS[fields[2]] + "_per_request"] = float(fields[0]) / requests
    return row


#: Rows and rows per transaction of the payload id measurement.
ID_ROWS = 60_000
ID_BATCH = 40
ID_PAYLOAD = '{"sensor":"s-17","reading":21.5,"unit":"C","tags":["bench","loopback"],"n":12345}'


def sqlite_ids(ordered: bool, workdir: Path) -> dict[str, float]:
    """ID_ROWS rows into a fresh destination table, ID_BATCH a transaction; costs per row."""
    conn = sqlite3.connect(workdir / f"ids-{ordered}.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        stamp = "2026-01-01T00:00:00.000000Z"
        before, io_before, started = resource.getrusage(resource.RUSAGE_SELF), _io(), time.perf_counter()
        for _ in range(ID_ROWS // ID_BATCH):
            rows = [
                (
                    new_payload_id() if ordered else os.urandom(16).hex(),
                    "default",
                    "default",
                    None,
                    None,
                    stamp,
                    ID_PAYLOAD,
                    stamp,
                )
                for _ in range(ID_BATCH)
            ]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(RAW_INSERT, rows)
            conn.execute("COMMIT")
        seconds, after, io_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF), _io()
    finally:
        conn.close()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {
        "rows_per_s": ID_ROWS / seconds,
        "cpu_us_per_row": cpu / ID_ROWS * 1e6,
        "bytes_written_per_row": (io_after["wchar"] - io_before["wchar"]) / ID_ROWS,
        "write_calls_per_row": (io_after["syscw"] - io_before["syscw"]) / ID_ROWS,
    }


def _io() -> dict[str, int]:
    """This process's I/O counters (Linux /proc/self/io)."""
    lines = Path("/proc/self/io").read_text().splitlines()
    return {name: int(value) for name, value in (line.split(": ") for line in lines)}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float)})
    return {k: spread([r[k] for r in rows if k in r]) for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-perf", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        "in_process": {"bare": [], "service": []},
        "gunicorn": {"bare": [], "service": []},
        "sqlite_payload_ids": {"random": [], "time_ordered": []},
    }
    for round_no in range(args.rounds):
        order = [("bare", BARE_APP), ("service", SERVICE_APP)]
        if round_no % 2:
            order.reverse()
        for name, app in order:
            runs["in_process"][name].append(in_process("bare" if name == "bare" else "service", args.requests))
            if not args.no_perf:
                counted = perf_stat(app, args.seconds)
                if counted is not None:
                    runs["gunicorn"][name].append(counted)
        # On the project's disk, not a tmpfs /tmp: the fsyncs are part of the cost.
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            for ordered in (False, True) if round_no % 2 == 0 else (True, False):
                runs["sqlite_payload_ids"]["time_ordered" if ordered else "random"].append(
                    sqlite_ids(ordered, Path(tmp))
                )
        log(
            f"round {round_no + 1}: in process "
            + ", ".join(f"{n} {runs['in_process'][n][-1]['cpu_us_per_request']:.1f} us" for n in ("bare", "service"))
        )
    report: dict[str, Any] = {
        kind: {name: {"median": summarise(rows), "rounds": rows} for name, rows in apps.items() if rows}
        for kind, apps in runs.items()
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: {n: v["median"] for n, v in a.items()} for k, a in report.items()}, indent=2))


if __name__ == "__main__":
    main()
