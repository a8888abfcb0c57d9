"""Child of bench/delivery.py: one worker's Service, started on a prefilled data dir, in a patched process.

    python -m bench._delivery_service DATA_DIR DESTINATION_URL

Patches like a gunicorn gevent worker (before psycopg is imported), starts the Service,
and prints JSON lines to stdout: {"event": "started", "t0": <time.time() just before
start>}, then {"event": "ready", ...} once replay is done. It then keeps delivering
until a line arrives on stdin (or stdin closes), drains, and prints {"event": "stopped"}.
"""

from __future__ import annotations

from gevent import monkey  # type: ignore[import-untyped, unused-ignore]

monkey.patch_all()

import json  # noqa: E402 - everything after patch_all(), as in a worker
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from gevent.socket import wait_read  # type: ignore[import-untyped, unused-ignore]  # noqa: E402

from nexus_gevent import lifecycle  # noqa: E402
from nexus_gevent.config import load_settings  # noqa: E402
from nexus_gevent.logs import configure_logging, get_logger  # noqa: E402

# Made-up tokens: nothing listens for HTTP in this process.
BENCH_TOKEN = "bench-delivery-source-token"  # noqa: S105
BENCH_ADMIN_TOKEN = "bench-delivery-admin-token"  # noqa: S105


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main(data_dir: Path, url: str) -> None:
    configure_logging("WARNING", json=True, stream=sys.stderr)
    settings = load_settings(
        {
            "NEXUS_DATA_DIR": str(data_dir),
            "NEXUS_DESTINATION_URL": url,
            "NEXUS_TOKEN": BENCH_TOKEN,
            "NEXUS_ADMIN_TOKEN": BENCH_ADMIN_TOKEN,
            "NEXUS_LOG_LEVEL": "WARNING",
        }
    )
    service = lifecycle.assemble(settings, get_logger("bench"))
    t0 = time.time()
    service.start()
    emit(event="started", t0=t0)
    service.wait_ready()
    result = service.replay_result
    emit(
        event="ready",
        ready_after=time.time() - t0,
        replay_seconds=result.seconds if result is not None else None,
        replayed_pending=len(result.pending) if result is not None else None,
        queue_size=settings.queue_size,
        queue_workers=settings.queue_workers,
    )
    # Wait for the parent's word without blocking the hub (sys.stdin is not patched).
    wait_read(sys.stdin.fileno())
    sys.stdin.readline()
    drained = service.shutdown(30)
    emit(event="stopped", drained=drained)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
