"""The shed path (429 while the queue is full) and worker memory with a full queue.

    .venv/bin/python -m bench.shed [--seconds 8] [--connections 64] [--queue-size 100]

Both hold the destination unavailable for the whole measurement: the bench keeps an
exclusive lock on the SQLite destination file (BEGIN EXCLUSIVE), so every delivery
attempt waits out busy_timeout and fails with "database is locked", and the queue
cannot empty.

- `shed`: a service with a small queue (NEXUS_QUEUE_SIZE) and a given policy. A short
  load first fills every worker's queue; then the measured load gets nothing but 429.
  Under `reject` a 429 stores nothing (no WAL write); under `durable` each 429'd entry
  is appended to the WAL with its fsync first, and kept in the backlog.
- `memory`: a service with the default queue (10,000 entries per worker) under the
  `reject` policy, so the queue fills exactly and nothing piles up past it; VmRSS of
  each worker (the gunicorn master's children) before and after.
- `memory_backlog`: the default queue and the `durable` policy; NDJSON batches of
  250-byte entries until every worker holds a full queue and a full in-memory backlog
  (100,000 entries waiting, the most a worker keeps in memory); VmRSS of each worker.

Prints JSON.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nexus_gevent.backlog import BACKLOG_MAX

from .harness import Server, cpu_seconds, gunicorn, log, rss_bytes, sqlite_locked, wrk
from .write_path import INBOUND, SERVICE_APP, cpu_row, gauge_sum, paced, wrk_row

#: The longest a fill may take: the queues fill in well under a second at any rate seen here.
FILL_TIMEOUT = 60.0
#: The seconds of each wrk run that fills the queues.
FILL_SECONDS = 2


def wait_ready_probe(server: Server, timeout: float = 30.0) -> None:
    """Wait until every worker has opened its destination (the lock needs the file to exist)."""
    db = server.data_dir / "nexus.db"
    deadline = time.monotonic() + timeout
    while not db.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{db} was never created")
        time.sleep(0.05)


def fill(server: Server, *, capacity: int, connections: int) -> dict[str, Any]:
    """Load the service until its queues (all workers) hold `capacity` entries, or answer only 429.

    Returns the last fill run's statuses and the queue depth then.
    """
    deadline = time.monotonic() + FILL_TIMEOUT
    runs = 0
    while True:
        result = wrk(server.url + INBOUND, token=server.token, connections=connections, seconds=FILL_SECONDS)
        runs += 1
        time.sleep(1.2)  # the gauges are published every second
        depth = gauge_sum(server.metrics(), "nexus_queue_depth")
        only_shed = result.statuses.get(429, 0) > 0 and result.statuses.get(202, 0) == 0
        if depth >= capacity or only_shed:
            return {"fill_runs": runs, "queue_depth": depth, "last_fill_statuses": result.statuses}
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queues hold {depth} of {capacity} after {runs} fill runs")


def shed(
    policy: str,
    *,
    seconds: float,
    connections: int,
    queue_size: int,
    workers: int = 2,
    paced_rate: float | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """429/s and latency with every queue full and the destination held unavailable.

    Flat out, the latency is mostly queueing (Little's law: `connections` requests always
    in flight). With `paced_rate`, a paced load at that rate follows, still with every
    queue full: its latency is what one 429 costs when the server is not saturated.
    """
    # The shed resend window off: wrk sends one body over and over, and under `durable`
    # the window would answer every resend of it 200 duplicate instead of storing it.
    env = {"NEXUS_SHED_POLICY": policy, "NEXUS_QUEUE_SIZE": str(queue_size), "NEXUS_SHED_RESEND_WINDOW": "0"}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(SERVICE_APP, Path(tmp), env=env) as server:
        wait_ready_probe(server)
        with sqlite_locked(server.data_dir / "nexus.db"):
            filled = fill(server, capacity=queue_size * workers, connections=connections)
            pids = server.worker_pids()
            cpu = cpu_seconds(pids)
            result = wrk(server.url + INBOUND, token=server.token, connections=connections, seconds=seconds)
            cpu = cpu_seconds(pids) - cpu
            after = server.metrics()
            paced_row = None
            if paced_rate is not None:
                paced_row = paced(server, paced_rate, seconds=seconds, connections=connections)
        row = {**wrk_row(result), **cpu_row(cpu, result)}
        if paced_row is not None:
            row["paced"] = paced_row
        row.update(
            policy=policy,
            queue_size=queue_size,
            shed_share=result.statuses.get(429, 0) / max(result.requests, 1),
            backlog_after=gauge_sum(after, "nexus_backlog_entries"),
            **filled,
        )
        return row


def memory(
    *, connections: int, queue_size: int = 10_000, workers: int = 2, workdir: Path | None = None
) -> dict[str, Any]:
    """VmRSS of every worker in MB (10^6 bytes), idle and with a full queue (destination held unavailable)."""
    env = {"NEXUS_SHED_POLICY": "reject", "NEXUS_QUEUE_SIZE": str(queue_size)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(SERVICE_APP, Path(tmp), env=env) as server:
        wait_ready_probe(server)
        pids = server.worker_pids()
        assert len(pids) == workers, pids
        idle = {pid: rss_bytes(pid) for pid in pids}
        with sqlite_locked(server.data_dir / "nexus.db"):
            filled = fill(server, capacity=queue_size * workers, connections=connections)
            full = {pid: rss_bytes(pid) for pid in pids}
        assert server.worker_pids() == pids, "a worker was replaced during the measurement"
        mb = 1_000_000
        return {
            "queue_size": queue_size,
            "workers": workers,
            "idle_rss_mb": [idle[p] / mb for p in pids],
            "full_rss_mb": [full[p] / mb for p in pids],
            "max_full_rss_mb": max(full.values()) / mb,
            "max_growth_mb": max(full[p] - idle[p] for p in pids) / mb,
            **filled,
        }


#: Entries per NDJSON request of the backlog fill, and the bytes of each (newline included), like post_batch.lua.
BACKLOG_FILL_ENTRIES = 200
BACKLOG_ENTRY_BYTES = 250
#: Threads posting the backlog fill, each with its own connection per request (so both workers get some).
BACKLOG_FILL_THREADS = 4
#: The longest the backlog fill may take.
BACKLOG_FILL_TIMEOUT = 180.0


def batch_body(entries: int, first: int = 0) -> bytes:
    """`entries` NDJSON lines of BACKLOG_ENTRY_BYTES bytes each (newline included)."""
    lines = []
    for n in range(first, first + entries):
        head = f'{{"sensor":"s-{n % 100_000:05d}","reading":21.5,"unit":"C","tags":["bench","batch"],"n":{n},"pad":"'
        lines.append(head + "x" * (BACKLOG_ENTRY_BYTES - 1 - len(head) - 2) + '"}\n')
    return "".join(lines).encode()


def fill_backlog(server: Server, *, entries: int, timeout: float = BACKLOG_FILL_TIMEOUT) -> dict[str, Any]:
    """POST NDJSON batches until the summed backlog gauge reaches `entries`; what was posted and answered."""
    numbers = itertools.count(0, BACKLOG_FILL_ENTRIES)
    headers = {"Content-Type": "application/x-ndjson", "Authorization": f"Bearer {server.token}"}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def post() -> None:
        while not stop.is_set():
            # Every body different: under `durable`, the same body again soon after a
            # durable 429 is a resend (the shed resend window), answered as a duplicate.
            with lock:
                first = next(numbers)
            body = batch_body(BACKLOG_FILL_ENTRIES, first)
            # A new connection each time: gunicorn hands each to whichever worker accepts it.
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                conn.request("POST", INBOUND, body=body, headers=headers)
                status = conn.getresponse().status
            finally:
                conn.close()
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=post, daemon=True) for _ in range(BACKLOG_FILL_THREADS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            time.sleep(1.2)  # the gauges are published every second
            backlog = gauge_sum(server.metrics(), "nexus_backlog_entries")
            if backlog >= entries:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the backlogs hold {backlog} of {entries} entries; answers {statuses}")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    time.sleep(1.2)
    values = server.metrics()
    return {
        "requests": dict(sorted(statuses.items())),
        "entries_posted": sum(statuses.values()) * BACKLOG_FILL_ENTRIES,
        "backlog": gauge_sum(values, "nexus_backlog_entries"),
        "queue_depth": gauge_sum(values, "nexus_queue_depth"),
    }


def memory_backlog(
    *, queue_size: int = 10_000, backlog: int = BACKLOG_MAX, workers: int = 2, workdir: Path | None = None
) -> dict[str, Any]:
    """VmRSS of every worker in MB, idle and with a full queue plus `backlog` durable entries waiting in memory."""
    env = {"NEXUS_SHED_POLICY": "durable", "NEXUS_QUEUE_SIZE": str(queue_size)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(SERVICE_APP, Path(tmp), env=env) as server:
        wait_ready_probe(server)
        pids = server.worker_pids()
        assert len(pids) == workers, pids
        idle = {pid: rss_bytes(pid) for pid in pids}
        with sqlite_locked(server.data_dir / "nexus.db"):
            filled = fill_backlog(server, entries=backlog * workers)
            full = {pid: rss_bytes(pid) for pid in pids}
        assert server.worker_pids() == pids, "a worker was replaced during the measurement"
        mb = 1_000_000
        return {
            "queue_size": queue_size,
            "backlog_per_worker": backlog,
            "entry_bytes": BACKLOG_ENTRY_BYTES,
            "workers": workers,
            "idle_rss_mb": [idle[p] / mb for p in pids],
            "full_rss_mb": [full[p] / mb for p in pids],
            "max_full_rss_mb": max(full.values()) / mb,
            "max_growth_mb": max(full[p] - idle[p] for p in pids) / mb,
            **filled,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=100)
    args = parser.parse_args()
    report = {
        policy: shed(policy, seconds=args.seconds, connections=args.connections, queue_size=args.queue_size)
        for policy in ("reject", "durable")
    }
    report["memory"] = memory(connections=args.connections)
    report["memory_backlog"] = memory_backlog()
    log(json.dumps({k: {kk: v[kk] for kk in v if not isinstance(v[kk], list)} for k, v in report.items()}))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
