"""Healthy delivery latency with and without poison entries retrying beside it, measured in one run.

One worker's service in-process (real WAL, real SQLite destination, default queue settings:
4 delivery greenlets, 5 attempts, backoff 1, 2, 4, 8 s). A trigger on `nexus_entries` refuses
every payload holding a marker, as a destination-side constraint would. Each round has two
phases of the same length, alternating: healthy writes alone, then the same healthy writes
while poison entries arrive (four at a time, every `--poison-every` seconds). Latency is
the time from a 202 to the row being in the destination file.

    .venv/bin/python -m bench.poison --rounds 3 --seconds 20
"""

from __future__ import annotations

# Patched first, as a gunicorn gevent worker is.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import falcon.testing  # noqa: E402
import gevent  # noqa: E402
import orjson  # noqa: E402

from nexus_gevent import lifecycle  # noqa: E402
from nexus_gevent.config import load_settings  # noqa: E402
from nexus_gevent.destinations import sqlite_path  # noqa: E402
from nexus_gevent.http.app import create_app  # noqa: E402
from nexus_gevent.logs import configure_logging, get_logger  # noqa: E402

TOKEN = "bench-poison-token-1"  # noqa: S105 -- made up for the benchmark
ADMIN = "bench-poison-admin-1"
MARKER = "bench-poison-marker"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_phase(
    client: falcon.testing.TestClient, db: str, seconds: float, rate: float, poison_every: float | None
) -> dict[str, float]:
    """Healthy writes at `rate`/s for `seconds`; with `poison_every`, four poison writes that often."""
    acked: dict[str, float] = {}
    landed: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def watch() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        last = conn.execute("SELECT coalesce(max(seq), 0) FROM nexus_entries").fetchone()[0]
        while True:
            rows = conn.execute("SELECT seq, payload_id FROM nexus_entries WHERE seq > ? ORDER BY seq", (last,))
            for seq, pid in rows:
                landed.setdefault(pid, time.monotonic())
                last = seq
            gevent.sleep(0.002)

    watcher = gevent.spawn(watch)
    started = time.monotonic()
    next_poison = started
    poisoned = 0
    n = 0
    while time.monotonic() - started < seconds:
        if poison_every is not None and time.monotonic() >= next_poison:
            for _ in range(4):
                result = client.simulate_post("/inbound/default", body=orjson.dumps({"m": MARKER}), headers=headers)
                assert result.status_code == 202, result.text
                poisoned += 1
            next_poison += poison_every
        result = client.simulate_post("/inbound/default", body=orjson.dumps({"healthy": n}), headers=headers)
        assert result.status_code == 202, result.text
        acked[result.json["payload_id"]] = time.monotonic()
        n += 1
        gevent.sleep(1.0 / rate)
    deadline = time.monotonic() + 30
    while not acked.keys() <= landed.keys() and time.monotonic() < deadline:
        gevent.sleep(0.01)
    watcher.kill()
    latencies = [landed[pid] - at for pid, at in acked.items() if pid in landed]
    return {
        "writes": len(acked),
        "delivered": len(latencies),
        "poison_written": poisoned,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=100.0, help="healthy writes a second")
    parser.add_argument("--poison-every", type=float, default=4.0, help="seconds between bursts of four poison writes")
    parser.add_argument("--out", type=Path, default=Path("bench/results/poison.json"))
    args = parser.parse_args()
    configure_logging("ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        env = {"NEXUS_DATA_DIR": tmp, "NEXUS_TOKEN": TOKEN, "NEXUS_ADMIN_TOKEN": ADMIN}
        service = lifecycle.assemble(load_settings(env), get_logger("bench"))
        service.start()
        assert service.wait_ready(30)
        db = sqlite_path(service.settings.destination("default").url)
        with sqlite3.connect(db, isolation_level=None) as conn:
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON nexus_entries "
                f"WHEN NEW.payload LIKE '%{MARKER}%' BEGIN SELECT RAISE(ABORT, 'poison'); END"
            )
        client = falcon.testing.TestClient(create_app(service, get_logger("bench")))
        rounds = []
        for _ in range(args.rounds):
            alone = run_phase(client, db, args.seconds, args.rate, None)
            poisoned = run_phase(client, db, args.seconds, args.rate, args.poison_every)
            rounds.append({"healthy_alone": alone, "healthy_with_poison": poisoned})
            print(json.dumps(rounds[-1]))
        service.shutdown(10)
    summary = {
        phase: {key: statistics.median(r[phase][key] for r in rounds) for key in ("p50_ms", "p99_ms", "max_ms")}
        for phase in ("healthy_alone", "healthy_with_poison")
    }
    result = {"settings": vars(args) | {"out": str(args.out)}, "rounds": rounds, "median": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": summary}))


if __name__ == "__main__":
    main()
