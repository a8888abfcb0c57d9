"""Full write path against the bare Falcon ceiling, same gunicorn settings, same run.

    .venv/bin/python -m bench.write_path [--rounds 3] [--seconds 10] [--connections 64]

Alternates the two apps for each round and prints the medians as JSON. The functions
here are what bench/suite.py calls: `ceiling` (the bare app, flat out), `saturate` (the
full path flat out, with SQLite delivery running, and whether delivery kept up) and
`paced` (a fixed offered rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .harness import Server, WrkResult, cpu_seconds, gunicorn, log, sqlite_rows, wrk

BARE_APP = "bench.bare_app:app"
SERVICE_APP = "wsgi:app"
INBOUND = "/inbound/default"
#: How often the queue and backlog gauges are sampled during a saturating load.
SAMPLE_INTERVAL = 1.0
#: How long delivery may take to catch up after a load before the next one starts.
CATCH_UP_TIMEOUT = 60.0


def wrk_row(result: WrkResult) -> dict[str, Any]:
    """The figures of one wrk run, in the units the reports use."""
    return {
        "seconds": result.seconds,
        "requests": result.requests,
        "requests_per_s": result.rate(),
        "accepted_per_s": result.rate(202),
        "shed_per_s": result.rate(429),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "socket_errors": result.errors,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_ms": result.max_ms,
    }


def ceiling(server: Server, *, seconds: float, connections: int) -> dict[str, Any]:
    """The bare app (or anything) flat out: wrk -c`connections`, no think time."""
    pids = server.worker_pids()
    cpu = cpu_seconds(pids)
    result = wrk(server.url + INBOUND, token=server.token, connections=connections, seconds=seconds)
    return {**wrk_row(result), **cpu_row(cpu_seconds(pids) - cpu, result)}


def cpu_row(cpu: float, result: WrkResult) -> dict[str, float]:
    """The workers' CPU time per request, and how many CPUs they kept busy, during a wrk run."""
    return {"cpu_us_per_request": cpu / max(result.requests, 1) * 1e6, "worker_cpus_busy": cpu / result.seconds}


def paced(server: Server, rate: float, *, seconds: float, connections: int) -> dict[str, Any]:
    """A load offered at `rate` requests/s (bench/post_rate.lua); the rate reached is in the row."""
    row = wrk_row(wrk(server.url + INBOUND, token=server.token, connections=connections, seconds=seconds, rate=rate))
    row["offered_per_s"] = rate
    return row


class GaugeSampler:
    """Samples the queue depth and backlog gauges of /metrics (all workers) in a thread."""

    def __init__(self, server: Server, interval: float = SAMPLE_INTERVAL) -> None:
        self._server = server
        self._interval = interval
        self._stop = threading.Event()
        self.depth: list[float] = []
        self.backlog: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                values = self._server.metrics()
            except OSError:
                continue
            self.depth.append(gauge_sum(values, "nexus_queue_depth"))
            self.backlog.append(gauge_sum(values, "nexus_backlog_entries"))


def gauge_sum(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def saturate(server: Server, *, seconds: float, connections: int) -> dict[str, Any]:
    """The full path flat out, SQLite delivery running meanwhile; and whether delivery kept up.

    Sustained means: no write was shed (429), the backlog (entries that did not fit in
    a queue) stayed 0 at every sample, and when the load stopped the rows delivered
    were behind the writes acknowledged by less than one second of intake.
    """
    db = server.data_dir / "nexus.db"
    before = sqlite_rows(db)
    pids = server.worker_pids()
    cpu = cpu_seconds(pids)
    with GaugeSampler(server) as gauges:
        result = wrk(server.url + INBOUND, token=server.token, connections=connections, seconds=seconds)
    cpu = cpu_seconds(pids) - cpu
    rows_at_end = sqlite_rows(db) - before
    row = {**wrk_row(result), **cpu_row(cpu, result)}
    acknowledged = result.statuses.get(202, 0) + result.statuses.get(429, 0)
    caught_up_after = catch_up(db, before + acknowledged)
    final = server.metrics()
    lag = acknowledged - rows_at_end
    row.update(
        acknowledged=acknowledged,
        delivered_at_load_end=rows_at_end,
        delivery_lag_at_load_end=lag,
        delivered_per_s=rows_at_end / result.seconds,
        caught_up_after_s=caught_up_after,
        queue_depth_samples=gauges.depth,
        backlog_samples=gauges.backlog,
        queue_depth_max=max(gauges.depth, default=0.0),
        backlog_max=max(gauges.backlog, default=0.0),
        backlog_after=gauge_sum(final, "nexus_backlog_entries"),
    )
    row["sustained"] = bool(
        result.statuses.get(429, 0) == 0 and row["backlog_max"] == 0 and lag < max(1.0, result.rate(202))
    )
    return row


def catch_up(db: Path, rows: int, timeout: float = CATCH_UP_TIMEOUT) -> float | None:
    """Seconds until the destination holds `rows` rows; None when it did not in `timeout`."""
    started = time.monotonic()
    while sqlite_rows(db) < rows:
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.1)
    return time.monotonic() - started


def wait_idle(server: Server, timeout: float = CATCH_UP_TIMEOUT) -> float | None:
    """Seconds until every queue and backlog of the service is empty (two gauge updates in a row)."""
    started = time.monotonic()
    empty = 0
    while empty < 2:
        if time.monotonic() - started > timeout:
            return None
        values = server.metrics()
        busy = gauge_sum(values, "nexus_queue_depth") + gauge_sum(values, "nexus_backlog_entries")
        empty = empty + 1 if busy == 0 else 0
        time.sleep(SAMPLE_INTERVAL + 0.1 if empty else 0.2)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {"bare": [], "service": []}
    keys = ("requests_per_s", "accepted_per_s", "shed_per_s", "p50_ms", "p99_ms", "max_ms")
    for round_no in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp, gunicorn(BARE_APP, Path(tmp)) as server:
            rows["bare"].append(ceiling(server, seconds=args.seconds, connections=args.connections))
        with tempfile.TemporaryDirectory() as tmp, gunicorn(SERVICE_APP, Path(tmp)) as server:
            rows["service"].append(saturate(server, seconds=args.seconds, connections=args.connections))
        for name in rows:
            log(f"round {round_no + 1} {name}: {json.dumps({k: rows[name][-1][k] for k in keys})}")
    summary: dict[str, Any] = {
        name: {key: statistics.median(r[key] for r in runs) for key in keys} for name, runs in rows.items()
    }
    summary["ratio_accepted_vs_bare"] = {
        "median": summary["service"]["accepted_per_s"] / summary["bare"]["accepted_per_s"],
    }
    print(json.dumps({"rounds": rows, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
