"""Full write path against the bare Falcon ceiling, same gunicorn settings, same run.

    .venv/bin/python -m bench.write_path [--rounds 3] [--seconds 10] [--connections 64]

Alternates the two apps for each round and prints the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from .harness import gunicorn, log, wrk


def _delivered(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM nexus_entries").fetchone()[0])
    except sqlite3.Error:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"bare": [], "service": []}
    for round_no in range(args.rounds):
        for name, app in (("bare", "bench.bare_app:app"), ("service", "wsgi:app")):
            with tempfile.TemporaryDirectory() as tmp, gunicorn(app, Path(tmp)) as server:
                result = wrk(
                    server.url + "/inbound/default",
                    token=server.token,
                    connections=args.connections,
                    seconds=args.seconds,
                )
                row = {
                    "requests_per_s": result.rate(),
                    "accepted_per_s": result.rate(202),
                    "shed_per_s": result.rate(429),
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "max_ms": result.max_ms,
                }
                if name == "service":
                    accepted = result.statuses.get(202, 0) + result.statuses.get(429, 0)
                    deadline = time.monotonic() + 120
                    db = Path(tmp) / "nexus.db"
                    while _delivered(db) < accepted and time.monotonic() < deadline:
                        time.sleep(0.2)
                    row["delivered"] = _delivered(db)
                    row["acknowledged"] = accepted
                rows[name].append(row)
                log(f"round {round_no + 1} {name}: {json.dumps(row)}")
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    summary["ratio_accepted_vs_bare"] = {
        "median": summary["service"]["accepted_per_s"] / summary["bare"]["accepted_per_s"],
    }
    print(json.dumps({"rounds": rows, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
