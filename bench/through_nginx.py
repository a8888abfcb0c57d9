"""Through nginx: offered load against accepted, shed and delivered rates, and backlog clearing.

    .venv/bin/python -m bench.through_nginx [--seconds 10] [--connections 64] [--queue-size 2000]
                                            [--outage-seconds 4]

A saturating wrk load through deploy/nginx.conf to a 2-worker service on SQLite. SQLite
delivery keeps up with intake on its own, so the run takes the destination away for
--outage-seconds in the middle of the load (a held exclusive lock: "database is
locked"); the queues fill and writes are shed. Reports, from one run: offered
(requests/s answered), accepted (202/s), shed (429/s), delivered (rows/s during the
load), and how long the shed backlog took to clear after the load stopped. Every
acknowledged entry (202, and 429 under the durable policy) must end up delivered.

bench/suite.py calls `direct_vs_nginx` (the same load straight at gunicorn and through
nginx, back to back) and can call `outage_run` (this CLI's run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .harness import Server, gunicorn, log, nginx, sqlite_locked, wrk
from .harness import sqlite_rows as _rows
from .write_path import INBOUND, catch_up, wrk_row


def _hold_lock(db: Path, after: float, seconds: float) -> None:
    """Make the destination unavailable for `seconds`, starting `after` seconds from now."""
    if seconds <= 0:
        return
    time.sleep(after)
    with sqlite_locked(db):
        time.sleep(seconds)


def direct_vs_nginx(
    server: Server, nginx_port: int, *, seconds: float, connections: int, nginx_first: bool
) -> dict[str, Any]:
    """The same saturating load at gunicorn directly and through nginx, back to back.

    Delivery catches up between the two, so neither starts with the other's backlog;
    `nginx_first` alternates the order between rounds.
    """
    db = server.data_dir / "nexus.db"
    urls = {"direct": server.url + INBOUND, "nginx": f"http://127.0.0.1:{nginx_port}{INBOUND}"}
    order = ("nginx", "direct") if nginx_first else ("direct", "nginx")
    rows: dict[str, Any] = {}
    for name in order:
        before = _rows(db)
        result = wrk(urls[name], token=server.token, connections=connections, seconds=seconds)
        rows[name] = wrk_row(result)
        catch_up(db, before + result.statuses.get(202, 0) + result.statuses.get(429, 0))
    rows["order"] = list(order)
    rows["ratio_nginx_to_direct"] = rows["nginx"]["accepted_per_s"] / max(rows["direct"]["accepted_per_s"], 1e-9)
    return rows


def outage_run(seconds: int, connections: int, queue_size: int, outage_seconds: float) -> dict[str, Any]:
    """Through nginx, with the destination taken away in the middle of the load."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        env = {"NEXUS_QUEUE_SIZE": str(queue_size)}
        with gunicorn("wsgi:app", data, env=env) as server, nginx([server.port], Path(tmp)) as port:
            db = data / "nexus.db"
            before = _rows(db)
            outage = threading.Thread(target=_hold_lock, args=(db, 1.0, outage_seconds), daemon=True)
            outage.start()
            result = wrk(
                f"http://127.0.0.1:{port}/inbound/default",
                token=server.token,
                connections=connections,
                seconds=seconds,
            )
            load_end = time.monotonic()
            outage.join()
            during = _rows(db) - before
            acknowledged = result.statuses.get(202, 0) + result.statuses.get(429, 0)
            deadline = load_end + 300
            while _rows(db) - before < acknowledged and time.monotonic() < deadline:
                time.sleep(0.05)
            cleared = time.monotonic() - load_end
            delivered = _rows(db) - before
        return {
            "offered_per_s": round(result.rate()),
            "accepted_per_s": round(result.rate(202)),
            "shed_per_s": round(result.rate(429)),
            "other_statuses": {k: v for k, v in result.statuses.items() if k not in (202, 429)},
            "delivered_per_s_during_load": round(during / result.seconds),
            "acknowledged": acknowledged,
            "delivered": delivered,
            "backlog_cleared_seconds": round(cleared, 2),
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "queue_size": queue_size,
            "outage_seconds": outage_seconds,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=2000)
    parser.add_argument("--outage-seconds", type=float, default=4.0)
    args = parser.parse_args()
    report = outage_run(args.seconds, args.connections, args.queue_size, args.outage_seconds)
    log(json.dumps(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
