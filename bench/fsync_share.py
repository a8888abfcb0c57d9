"""How much of a write's latency at moderate load is the disk's fsync.

    .venv/bin/python -m bench.fsync_share [--rate 1100] [--rounds 3] [--seconds 10]

The same paced load (bench/post_rate.lua, 64 connections) at one fixed rate, against:

- `bare`: the bare Falcon app (the ceiling's app), for the machine's own floor;
- `disk`: the service with its data directory (WAL and SQLite) on the disk, as deployed;
- `tmpfs`: the same service with its data directory on /dev/shm, where fsync returns at
  once: everything the write path does but wait for the disk.

The three alternate within each round; medians of p50/p90/p99 are printed as JSON. The
gap between `disk` and `tmpfs` is the time requests spend waiting for fsyncs; the gap
between `tmpfs` and `bare` is the rest of the write path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import get_metrics, gunicorn, log, wrk
from .write_path import BARE_APP, INBOUND, SERVICE_APP

#: A tmpfs: the service only keeps its own temporary data directory there.
TMPFS = Path("/dev/shm")  # noqa: S108
#: Seconds of load before the measured run: the workers' first requests are slower.
WARM_UP = 3.0

CASES = {"bare": (BARE_APP, None), "disk": (SERVICE_APP, None), "tmpfs": (SERVICE_APP, TMPFS)}


def paced_run(app: str, base: Path | None, rate: float, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nexus-fsync-", dir=base) as tmp, gunicorn(app, Path(tmp)) as server:
        wrk(server.url + INBOUND, token=server.token, seconds=WARM_UP, rate=rate)
        result = wrk(server.url + INBOUND, token=server.token, seconds=seconds, rate=rate)
        row = {
            "reached_per_s": result.rate(),
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "max_ms": result.max_ms,
        }
        if app == SERVICE_APP:
            # The append latency histogram is published once a second.
            time.sleep(1.5)
            buckets = wal_append_buckets(get_metrics(server.url, server.admin_token))
            for quantile in (0.5, 0.9, 0.99):
                row[f"wal_append_p{round(quantile * 100)}_ms_at_most"] = bucket_quantile(buckets, quantile) * 1000
    return row


def wal_append_buckets(metrics: dict[str, float]) -> list[tuple[float, float]]:
    """(upper bound in s, cumulative count) of nexus_wal_append_latency_seconds, summed over workers."""
    prefix = 'nexus_wal_append_latency_seconds_bucket{le="'
    found = [(key[len(prefix) : -2], value) for key, value in metrics.items() if key.startswith(prefix)]
    return sorted((float(bound), count) for bound, count in found)


def bucket_quantile(buckets: list[tuple[float, float]], quantile: float) -> float:
    """The smallest bucket bound holding at least `quantile` of the observations."""
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= quantile * total:
            return bound
    return float("nan")


def run(rate: float, rounds: int, seconds: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CASES}
    for round_no in range(1, rounds + 1):
        for name, (app, base) in CASES.items():
            row = paced_run(app, base, rate, seconds)
            runs[name].append(row)
            figures = f"{row['reached_per_s']:,.0f}/s p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms"
            log(f"round {round_no} {name}: {figures}")
    return {
        "rate_offered": rate,
        "medians": {
            name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()
        },
        "rounds": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1100.0, help="offered requests/s, in all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if not TMPFS.is_dir():
        parser.error(f"{TMPFS} is missing: this comparison needs a tmpfs")
    print(json.dumps(run(args.rate, args.rounds, args.seconds), indent=2))


if __name__ == "__main__":
    main()
