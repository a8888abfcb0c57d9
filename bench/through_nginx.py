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
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from .harness import gunicorn, log, nginx, wrk


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM nexus_entries").fetchone()[0])
    except sqlite3.Error:
        return 0


def _hold_lock(db: Path, after: float, seconds: float) -> None:
    """Make the destination unavailable for `seconds`, starting `after` seconds from now."""
    if seconds <= 0:
        return
    time.sleep(after)
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=2000)
    parser.add_argument("--outage-seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        env = {"NEXUS_QUEUE_SIZE": str(args.queue_size)}
        with gunicorn("wsgi:app", data, env=env) as server, nginx([server.port], Path(tmp)) as port:
            db = data / "nexus.db"
            before = _rows(db)
            outage = threading.Thread(target=_hold_lock, args=(db, 1.0, args.outage_seconds), daemon=True)
            outage.start()
            result = wrk(
                f"http://127.0.0.1:{port}/inbound/default",
                token=server.token,
                connections=args.connections,
                seconds=args.seconds,
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
        report = {
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
            "queue_size": args.queue_size,
            "outage_seconds": args.outage_seconds,
        }
        log(json.dumps(report))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
