"""The worker CPU an OTLP request's decoding and mapping take: protobuf against OTLP/JSON, same run.

    .venv/bin/python -m bench.otlp_decode [--rounds 7]

bench.otlp's export request (100 records) and one of 1000, each as protobuf and as the
OTLP/JSON an exporter sends (hex ids, int64 as strings), through otlp.decode_request and
otlp.log_entries in this process: what a worker does on its gevent hub before the WAL
append. Medians of the rounds, alternating which encoding goes first, and the ratio
JSON / protobuf within the run. Prints JSON; writes nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
from typing import Any

import orjson
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from nexus_gevent import otlp

from .otlp import export_request

#: Records a request: bench.otlp's, and the largest NEXUS_MAX_BATCH_ENTRIES allows by default.
SIZES = (100, 1000)


def as_otlp_json(protobuf: bytes) -> bytes:
    """The same request as OTLP/JSON: protobuf's JSON mapping with hex trace and span ids."""
    value = json_format.MessageToDict(ExportLogsServiceRequest.FromString(protobuf))
    for resource_logs in value["resourceLogs"]:
        for scope_logs in resource_logs["scopeLogs"]:
            for record in scope_logs["logRecords"]:
                for name in ("traceId", "spanId"):
                    record[name] = base64.b64decode(record[name]).hex()
    return orjson.dumps(value)


def decode_and_map_ms(body: bytes, encoding: otlp.Encoding) -> float:
    started = time.perf_counter()
    otlp.log_entries(otlp.decode_request(body, encoding), "service.name")
    return (time.perf_counter() - started) * 1000


def run(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in SIZES:
        bodies: dict[otlp.Encoding, bytes] = {"protobuf": export_request(size)}
        bodies["json"] = as_otlp_json(bodies["protobuf"])
        times: dict[str, list[float]] = {"protobuf": [], "json": []}
        for round_no in range(rounds):
            order: list[otlp.Encoding] = ["protobuf", "json"] if round_no % 2 else ["json", "protobuf"]
            for encoding in order:
                times[encoding].append(decode_and_map_ms(bodies[encoding], encoding))
        medians = {encoding: statistics.median(ms) for encoding, ms in times.items()}
        results[f"{size}_records"] = {
            "bytes": {encoding: len(body) for encoding, body in bodies.items()},
            "median_ms": {encoding: round(ms, 2) for encoding, ms in medians.items()},
            "us_per_record": {encoding: round(ms * 1000 / size, 1) for encoding, ms in medians.items()},
            "json_over_protobuf": round(medians["json"] / medians["protobuf"], 1),
        }
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.rounds), indent=2))


if __name__ == "__main__":
    main()
