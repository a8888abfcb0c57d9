"""OTLP logs against the NDJSON batch path: records/s through POST /v1/logs and /inbound, same run.

    .venv/bin/python -m bench.otlp [--rounds 3] [--seconds 5] [--connections 64]

Each round, alternating which goes first, a fresh service each (wsgi:app under
gunicorn.conf.py, 2 gevent workers, SQLite destination delivering meanwhile) flat out
with wrk: once with OTLP/HTTP protobuf requests of RECORDS_PER_REQUEST log records
(bench/post_otlp.lua; each record a body, severity, timestamps, ids and four attributes,
its stored payload about 400 bytes), once with NDJSON batches of the same number of
entries of about 250 bytes (bench.batch_path's load and bench/post_batch.lua). wrk sends
one body over and over, so the shed resend window is off (NEXUS_SHED_RESEND_WINDOW=0):
otherwise, after the first durable 429, every request would be a "resend" storing
nothing. Records/s stored (the service's nexus_writes_accepted_total plus
nexus_writes_shed_total: under the default durable policy a shed record is stored too),
and delivered (rows gained during the load), medians of the rounds, and the ratio
OTLP / NDJSON of records stored within each round.
Writes bench/results/otlp.json and prints the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs, SeverityNumber
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from . import batch_path
from .harness import ROOT, Server, cpu_seconds, gunicorn, log, parse_wrk, sqlite_rows
from .write_path import SERVICE_APP, catch_up, gauge_sum, wait_idle

RESULTS = ROOT / "bench" / "results"
#: Log records an export request carries: the issue's figure, and bench.batch_path's batch.
RECORDS_PER_REQUEST = batch_path.BATCH_ENTRIES
CONNECTIONS = batch_path.CONNECTIONS
#: Every request a new write, though wrk repeats one body (see above).
SERVICE_ENV = {"NEXUS_SHED_RESEND_WINDOW": "0"}


def export_request(records: int = RECORDS_PER_REQUEST) -> bytes:
    """An ExportLogsServiceRequest as an SDK sends it: one resource, one scope, `records` log records."""

    def attribute(key: str, value: AnyValue) -> KeyValue:
        return KeyValue(key=key, value=value)

    logs = [
        LogRecord(
            time_unix_nano=1_765_000_000_000_000_000 + n,
            observed_time_unix_nano=1_765_000_000_000_000_500 + n,
            severity_number=SeverityNumber.SEVERITY_NUMBER_INFO,
            severity_text="INFO",
            body=AnyValue(string_value=f"sensor s-{n:05d} reading 21.5 C within its bounds"),
            attributes=[
                attribute("sensor", AnyValue(string_value=f"s-{n:05d}")),
                attribute("reading", AnyValue(double_value=21.5)),
                attribute("unit", AnyValue(string_value="C")),
                attribute("n", AnyValue(int_value=n)),
            ],
            trace_id=bytes.fromhex("5b8efff798038103d269b633813fc60c"),
            span_id=bytes.fromhex("eee19b7ec3c1b174"),
            flags=1,
        )
        for n in range(records)
    ]
    resource = Resource(
        attributes=[
            attribute("service.name", AnyValue(string_value="bench-sensors")),
            attribute("host.name", AnyValue(string_value="bench-host")),
        ]
    )
    scope = ScopeLogs(scope=InstrumentationScope(name="bench.otlp", version="1.0.0"), log_records=logs)
    return ExportLogsServiceRequest(
        resource_logs=[ResourceLogs(resource=resource, scope_logs=[scope])]
    ).SerializeToString()


def load_otlp(server: Server, body_file: Path, *, seconds: float, connections: int) -> dict[str, Any]:
    """wrk flat out with one export request of RECORDS_PER_REQUEST records; records/s accepted and delivered."""
    db = server.data_dir / "nexus.db"
    before = sqlite_rows(db)
    accepted_before = gauge_sum(server.metrics(), "nexus_writes_accepted_total")
    pids = server.worker_pids()
    cpu = cpu_seconds(pids)
    env = {**os.environ, "NEXUS_BENCH_TOKEN": server.token, "NEXUS_BENCH_BODY": str(body_file)}
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    cmd += ["-s", str(ROOT / "bench" / "post_otlp.lua"), server.url + "/v1/logs"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    result = parse_wrk(out)
    cpu = cpu_seconds(pids) - cpu
    delivered = sqlite_rows(db) - before
    accepted = gauge_sum(server.metrics(), "nexus_writes_accepted_total") - accepted_before
    shed = result.statuses.get(429, 0) * RECORDS_PER_REQUEST
    caught_up = catch_up(db, before + int(accepted) + shed)
    return {
        "records_per_request": RECORDS_PER_REQUEST,
        "seconds": result.seconds,
        "requests_per_s": result.rate(),
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "socket_errors": result.errors,
        "accepted_entries_per_s": accepted / result.seconds,
        "delivered_entries_per_s": delivered / result.seconds,
        "caught_up_after_s": caught_up,
        "cpu_us_per_entry": cpu / max(accepted, 1) * 1e6,
        "worker_cpus_busy": cpu / result.seconds,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
    }


def stored(server: Server) -> float:
    """Entries the service has stored so far (accepted, and shed under the durable policy), over every worker."""
    values = server.metrics()
    return gauge_sum(values, "nexus_writes_accepted_total") + gauge_sum(values, "nexus_writes_shed_total")


def run_round(round_no: int, *, seconds: float, connections: int, workdir: Path, body_file: Path) -> dict[str, Any]:
    """One round: OTLP and NDJSON loads, in alternating order, a fresh service each."""
    row: dict[str, Any] = {"round": round_no}
    order = ["otlp", "ndjson"]
    if round_no % 2 == 0:
        order.reverse()
    for name in order:
        with (
            tempfile.TemporaryDirectory(dir=workdir) as tmp,
            gunicorn(SERVICE_APP, Path(tmp) / "data", env=SERVICE_ENV) as server,
        ):
            stored_before = stored(server)
            if name == "otlp":
                row[name] = load_otlp(server, body_file, seconds=seconds, connections=connections)
            else:
                with batch_path.sqlite_target(Path(tmp) / "data") as target:
                    row[name] = batch_path.load(
                        server, target, RECORDS_PER_REQUEST, seconds=seconds, connections=connections, rate=None
                    )
            row[name]["stored_entries_per_s"] = (stored(server) - stored_before) / row[name]["seconds"]
            # Worker CPU over every record stored (the loads' own figure divides by the accepted ones only).
            row[name]["cpu_us_per_stored_entry"] = (
                row[name]["worker_cpus_busy"] * 1e6 / max(row[name]["stored_entries_per_s"], 1e-9)
            )
            wait_idle(server)
        r = row[name]
        log(
            f"round {round_no} {name}: {r['stored_entries_per_s']:,.0f} records/s stored, "
            f"{r['delivered_entries_per_s']:,.0f} delivered, {r['cpu_us_per_stored_entry']:.1f} us CPU a record, "
            f"p99 {r['p99_ms']} ms, statuses {r['statuses']}"
        )
    row["ratio_otlp_to_ndjson"] = row["otlp"]["stored_entries_per_s"] / max(row["ndjson"]["stored_entries_per_s"], 1e-9)
    return row


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of the figures the docs quote."""

    def median(name: str, key: str) -> float:
        return statistics.median(float(r[name][key]) for r in rounds)

    return {
        "otlp_stored_records_per_s": median("otlp", "stored_entries_per_s"),
        "otlp_delivered_records_per_s": median("otlp", "delivered_entries_per_s"),
        "otlp_cpu_us_per_record": median("otlp", "cpu_us_per_stored_entry"),
        "otlp_p99_ms": median("otlp", "p99_ms"),
        "ndjson_stored_entries_per_s": median("ndjson", "stored_entries_per_s"),
        "ndjson_delivered_entries_per_s": median("ndjson", "delivered_entries_per_s"),
        "ndjson_cpu_us_per_entry": median("ndjson", "cpu_us_per_stored_entry"),
        "ndjson_p99_ms": median("ndjson", "p99_ms"),
        "ratio_otlp_to_ndjson": statistics.median(r["ratio_otlp_to_ndjson"] for r in rounds),
        "ratio_otlp_to_ndjson_min": min(r["ratio_otlp_to_ndjson"] for r in rounds),
        "ratio_otlp_to_ndjson_max": max(r["ratio_otlp_to_ndjson"] for r in rounds),
        "rounds": len(rounds),
    }


def run(rounds: int, *, seconds: float, connections: int = CONNECTIONS, workdir: Path) -> dict[str, Any]:
    """Every round and the medians; what bench.suite stores under "otlp"."""
    body = export_request()
    body_file = workdir / "otlp-export.bin"
    body_file.write_bytes(body)
    rows = [
        run_round(n, seconds=seconds, connections=connections, workdir=workdir, body_file=body_file)
        for n in range(1, rounds + 1)
    ]
    return {
        "settings": {
            "records_per_request": RECORDS_PER_REQUEST,
            "otlp_request_bytes": len(body),
            "ndjson_entry_bytes": batch_path.ENTRY_BYTES,
            "connections": connections,
            "seconds": seconds,
            "workers": 2,
        },
        "rounds": rows,
        "median": summary(rows),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--out", type=Path, default=RESULTS / "otlp.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nexus-otlp-") as tmp:
        results = run(args.rounds, seconds=args.seconds, connections=args.connections, workdir=Path(tmp))
    results["command"] = "python -m bench.otlp " + " ".join(argv if argv is not None else sys.argv[1:])
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["median"], indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
