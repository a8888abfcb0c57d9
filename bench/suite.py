"""The benchmark suite: one command, every figure, results in bench/results/.

    .venv/bin/pip install -r bench/requirements.txt     # matplotlib, for the plots
    .venv/bin/python -m bench.suite [--quick] [--rounds 3] [--seconds 8] [--only SECTIONS]

All load comes from this machine over loopback, with wrk (-t2 -c64) and bench/post.lua
(or bench/post_rate.lua for a paced load). Each round runs, back to back:

1. ceiling: the bare Falcon app (bench.bare_app) under gunicorn.conf.py (gevent, 2 workers), flat out;
2. write path: the service (wsgi:app, SQLite destination delivering meanwhile) flat out,
   whether delivery kept up, then a paced load at half the rate it just reached;
3. direct vs nginx: the same flat-out load at gunicorn and through deploy/nginx.conf;
4. shed: 429s with the queues full and the destination locked, policy `reject`, then `durable`;
5. memory: worker VmRSS with full 10,000-entry queues, then with full queues and 100,000-entry backlogs.

Ratios (write path / ceiling, 429s / ceiling, nginx / direct) are taken within a round,
then summarised as median, min and max over the rounds. After the rounds: the load
curves (paced loads at fractions of this run's ceiling, for the plots), the batch path
(bench.batch_path: the highest sustained rate for 1, 10, 100 and 1000 entries a request
against SQLite, 100 a request against PostgreSQL, and the raw drivers' executemany, in
rounds of their own), OTLP logs against the NDJSON batch path (bench.otlp), delivery from
a WAL backlog (bench.delivery) and replay (bench.replay).

Writes bench/results/suite.json, suite.md, load_throughput.png, load_p99.png,
replay.png, load_curve.csv, batch_sizes.png and batch_sizes.csv (or, with --quick, the same under bench/results/quick/).
Without matplotlib the plots are skipped and the CSV is all there is; suite.md says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nexus_gevent.logs import configure_logging

from . import batch_path, delivery, otlp, replay, report, shed
from .harness import gunicorn, log, nginx
from .through_nginx import direct_vs_nginx
from .write_path import BARE_APP, SERVICE_APP, ceiling, paced, saturate, wait_idle

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SECTIONS = ("http", "curves", "batch", "otlp", "delivery", "replay")
CONNECTIONS = 64
#: Offered load of the curves, as fractions of this run's ceiling.
CURVE_FRACTIONS = (0.10, 0.25, 0.50, 0.75, 1.00, 1.25)
CURVE_FRACTIONS_QUICK = (0.25, 0.50, 1.00, 1.25)
#: The shed measurement's queue: small, so it fills at once.
SHED_QUEUE_SIZE = 100


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


@contextlib.contextmanager
def timed(name: str, into: dict[str, float]) -> Iterator[None]:
    started = time.monotonic()
    log(f"-- {name}")
    try:
        yield
    finally:
        into[name] = round(time.monotonic() - started, 1)


def http_round(round_no: int, *, seconds: float, connections: int, workdir: Path) -> dict[str, Any]:
    """One round of every HTTP measurement; ratios are taken against this round's ceiling."""
    row: dict[str, Any] = {"round": round_no, "loadavg_start": loadavg()}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(BARE_APP, Path(tmp)) as bare:
        row["ceiling"] = ceiling(bare, seconds=seconds, connections=connections)
    log(f"round {round_no} ceiling: {row['ceiling']['requests_per_s']:,.0f}/s p99 {row['ceiling']['p99_ms']} ms")

    with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(SERVICE_APP, Path(tmp) / "data") as service:
        row["write_path"] = saturate(service, seconds=seconds, connections=connections)
        w = row["write_path"]
        log(
            f"round {round_no} write path: {w['accepted_per_s']:,.0f}/s accepted, p99 {w['p99_ms']} ms, "
            f"sustained={w['sustained']} (lag {w['delivery_lag_at_load_end']}, backlog max {w['backlog_max']})"
        )
        half = w["accepted_per_s"] / 2
        row["half_max"] = paced(service, half, seconds=seconds, connections=connections)
        h = row["half_max"]
        log(f"round {round_no} half max: offered {half:,.0f}/s, got {h['accepted_per_s']:,.0f}/s, p99 {h['p99_ms']} ms")
        wait_idle(service)
        with nginx([service.port], Path(tmp)) as port:
            row["direct_vs_nginx"] = direct_vs_nginx(
                service, port, seconds=seconds, connections=connections, nginx_first=round_no % 2 == 0
            )
        n = row["direct_vs_nginx"]
        log(
            f"round {round_no} nginx {n['nginx']['accepted_per_s']:,.0f}/s vs direct "
            f"{n['direct']['accepted_per_s']:,.0f}/s ({n['ratio_nginx_to_direct']:.2f})"
        )

    for policy in ("reject", "durable"):
        key = f"shed_{policy}"
        row[key] = shed.shed(
            policy,
            seconds=seconds,
            connections=connections,
            queue_size=SHED_QUEUE_SIZE,
            paced_rate=row["ceiling"]["accepted_per_s"] / 2 if policy == "reject" else None,
            workdir=workdir,
        )
        s = row[key]
        log(f"round {round_no} shed {policy}: {s['shed_per_s']:,.0f} 429/s, p99 {s['p99_ms']} ms")
        if "paced" in s:
            log(f"round {round_no} shed {policy} at half the ceiling: p99 {s['paced']['p99_ms']} ms")
    row["memory"] = shed.memory(connections=connections, workdir=workdir)
    log(f"round {round_no} memory: {row['memory']['full_rss_mb']} MB with full queues")
    row["memory_backlog"] = shed.memory_backlog(workdir=workdir)
    log(f"round {round_no} memory: {row['memory_backlog']['full_rss_mb']} MB with full queues and backlogs")

    ceil = row["ceiling"]["accepted_per_s"]
    row["ratios"] = {
        "write_path_to_ceiling": row["write_path"]["accepted_per_s"] / ceil,
        "shed_reject_to_ceiling": row["shed_reject"]["shed_per_s"] / ceil,
        "shed_durable_to_ceiling": row["shed_durable"]["shed_per_s"] / ceil,
        "nginx_to_direct": row["direct_vs_nginx"]["ratio_nginx_to_direct"],
        "cpu_per_request_ceiling_to_write_path": (
            row["ceiling"]["cpu_us_per_request"] / row["write_path"]["cpu_us_per_request"]
        ),
    }
    row["loadavg_end"] = loadavg()
    return row


def curves(ceiling_rate: float, fractions: tuple[float, ...], *, seconds: float, workdir: Path) -> dict[str, Any]:
    """Paced loads at fractions of `ceiling_rate`, against the bare app and the write path."""
    out: dict[str, Any] = {"ceiling_rate": ceiling_rate, "fractions": list(fractions), "seconds": seconds}
    for name, app in (("ceiling", BARE_APP), ("write_path", SERVICE_APP)):
        points: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(dir=workdir) as tmp, gunicorn(app, Path(tmp) / "data") as server:
            for fraction in fractions:
                point = paced(server, ceiling_rate * fraction, seconds=seconds, connections=CONNECTIONS)
                point["fraction"] = fraction
                point["loadavg"] = loadavg()
                points.append(point)
                log(
                    f"curve {name} {fraction:.0%}: offered {point['offered_per_s']:,.0f}/s, "
                    f"got {point['accepted_per_s']:,.0f}/s, p99 {point['p99_ms']} ms"
                )
                if app == SERVICE_APP:
                    # Delivery catches up first, so the next point does not start behind.
                    wait_idle(server)
        out[name] = points
    return out


def off_http(
    only: set[str], args: argparse.Namespace, workdir: Path, durations: dict[str, float], results: dict[str, Any]
) -> None:
    """The sections after the HTTP rounds and curves: batch path, OTLP, delivery, replay."""
    seconds = results["seconds_per_load"]
    if "batch" in only:
        with timed("batch path", durations):
            results["batch_path"] = batch_path.run(
                args.rounds, seconds=seconds, postgres_url=args.postgres_url, workdir=workdir
            )
    if "otlp" in only:
        with timed("otlp", durations):
            results["otlp"] = otlp.run(args.rounds, seconds=seconds, workdir=workdir)
    if "delivery" in only:
        with timed("delivery", durations):
            results["delivery"] = delivery.run(
                20_000 if args.quick else 100_000,
                args.rounds,
                postgres_url=args.postgres_url,
                workdir=workdir,
            )
    if "replay" in only:
        with timed("replay", durations):
            sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
            results["replay"] = replay.run(sizes, args.rounds, workdir=workdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short loads, 20k delivery backlog, no 1M replay")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=None, help="per wrk run (default 8, quick 3)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=None, help="default bench/results (quick: bench/results/quick)")
    parser.add_argument("--postgres-url", default=None, help="for delivery; default: a private server")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    seconds = args.seconds if args.seconds is not None else (3.0 if args.quick else 8.0)
    out = args.out if args.out is not None else (RESULTS / "quick" if args.quick else RESULTS)
    configure_logging("WARNING", json=True, stream=sys.stderr)

    started = time.monotonic()
    durations: dict[str, float] = {}
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.suite", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "rounds_asked": args.rounds,
        "seconds_per_load": seconds,
        "connections": CONNECTIONS,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version,
            "wrk": version(["wrk", "-v"]),
            "nginx": version(["nginx", "-v"]),
            "loadavg_start": loadavg(),
        },
        "sections": sorted(only),
    }
    with tempfile.TemporaryDirectory(prefix="nexus-suite-") as tmp:
        workdir = Path(tmp)
        if "http" in only or "curves" in only:
            rounds: list[dict[str, Any]] = []
            if "http" in only:
                with timed("http rounds", durations):
                    for round_no in range(1, args.rounds + 1):
                        rounds.append(http_round(round_no, seconds=seconds, connections=CONNECTIONS, workdir=workdir))
                results["rounds"] = rounds
            if "curves" in only:
                with timed("curves", durations):
                    if rounds:
                        ceiling_rate = statistics.median(r["ceiling"]["accepted_per_s"] for r in rounds)
                    else:
                        with tempfile.TemporaryDirectory(dir=workdir) as d, gunicorn(BARE_APP, Path(d)) as bare:
                            ceiling_rate = ceiling(bare, seconds=seconds, connections=CONNECTIONS)["accepted_per_s"]
                    fractions = CURVE_FRACTIONS_QUICK if args.quick else CURVE_FRACTIONS
                    results["curves"] = curves(ceiling_rate, fractions, seconds=min(seconds, 6.0), workdir=workdir)
        off_http(only, args, workdir, durations, results)
    results["machine"]["loadavg_end"] = loadavg()
    results["durations_s"] = {**durations, "total": round(time.monotonic() - started, 1)}
    results["figures"] = report.figures(results)
    written = report.write(results, out)
    log(f"wrote {', '.join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written)}")
    log(report.figures_table(results["figures"]))


if __name__ == "__main__":
    main()
