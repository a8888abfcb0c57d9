"""Replay (startup) time against the number of pending entries.

    .venv/bin/python -m bench.replay [--sizes 10000,100000,1000000] [--rounds 3]

For each size, a WAL directory is prefilled once with that many PENDING entries, written
straight as frames into segment files of the default size (no fsync per append: the
prefill only has to be fast), and then, each round:

- `replay_directory`: nexus_gevent.wal.replay.replay_directory on it, in this thread;
- `wal_replay`: a `Wal` on the directory, and `Wal.replay()`, which runs replay_directory
  in the WAL's I/O thread and then indexes every pending entry (what a worker does at start).

Entries/s = pending entries / seconds. The segments were just written, so they are read
from the page cache: this measures decoding and indexing, not the disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from nexus_gevent.entry import Entry
from nexus_gevent.logs import configure_logging, get_logger
from nexus_gevent.wal import DEFAULT_SEGMENT_BYTES, Wal, replay_directory
from nexus_gevent.wal import records as wal_records
from nexus_gevent.wal._frame import encode
from nexus_gevent.wal.segments import segment_path

from .harness import log

#: Entries built and framed at a time during the prefill.
CHUNK = 20_000


def entries(n: int, chunk: int = CHUNK) -> Iterator[list[Entry]]:
    """N entries like bench/delivery.py's (a ~150-byte JSON payload each), `chunk` at a time."""
    now = time.time()
    for start in range(0, n, chunk):
        yield [
            Entry(
                payload_id=uuid.uuid4().hex,
                source="default",
                destination="default",
                payload=orjson.dumps(
                    {
                        "n": i,
                        "device": f"sensor-{i % 1000:04d}",
                        "reading": round(20 + (i % 97) / 8, 3),
                        "unit": "celsius",
                        "tags": ["bench", "replay"],
                        "note": "prefilled straight into the WAL",
                    }
                ),
                received_at=now + i * 1e-6,
            )
            for i in range(start, min(n, start + chunk))
        ]


def prefill(directory: Path, n: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> dict[str, float]:
    """Write N PENDING entries as WAL frames into segments of `directory`; sizes and seconds."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    number, written, total = 0, 0, 0
    out = segment_path(directory, number).open("wb")
    try:
        for chunk in entries(n):
            buf = b"".join(encode(wal_records.ENTRY, wal_records.encode_entry(e)) for e in chunk)
            out.write(buf)
            written += len(buf)
            total += len(buf)
            if written >= segment_bytes:
                out.close()
                number, written = number + 1, 0
                out = segment_path(directory, number).open("wb")
    finally:
        out.close()
    return {"bytes": total, "segments": number + 1, "prefill_seconds": time.perf_counter() - started}


def time_replay_directory(directory: Path, n: int) -> dict[str, float]:
    started = time.perf_counter()
    result = replay_directory(directory)
    seconds = time.perf_counter() - started
    assert len(result.pending) == n, (len(result.pending), n)
    return {"seconds": seconds, "entries_per_s": n / seconds}


def time_wal_replay(directory: Path, n: int) -> dict[str, float]:
    wal = Wal(directory, logger=get_logger("bench"))
    try:
        started = time.perf_counter()
        result = wal.replay()
        seconds = time.perf_counter() - started
    finally:
        wal.close()
    assert len(result.pending) == n, (len(result.pending), n)
    return {"seconds": seconds, "entries_per_s": n / seconds}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(sizes: list[int], rounds: int, workdir: Path | None = None) -> dict[str, Any]:
    """Prefill each size once, time both replays `rounds` times; entries/s medians, min, max."""
    report: dict[str, Any] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="nexus-replay-", dir=workdir) as tmp:
            directory = Path(tmp) / "wal"
            info = prefill(directory, n)
            runs: dict[str, list[dict[str, float]]] = {"replay_directory": [], "wal_replay": []}
            for round_no in range(1, rounds + 1):
                runs["replay_directory"].append(time_replay_directory(directory, n))
                runs["wal_replay"].append(time_wal_replay(directory, n))
                done = (f"{k} {v[-1]['entries_per_s']:,.0f}/s ({v[-1]['seconds']:.2f} s)" for k, v in runs.items())
                log(f"replay {n:,} round {round_no}: " + ", ".join(done))
            report[str(n)] = {
                "pending": n,
                **info,
                **{
                    name: {
                        "entries_per_s": spread([r["entries_per_s"] for r in results]),
                        "seconds": spread([r["seconds"] for r in results]),
                        "rounds": results,
                    }
                    for name, results in runs.items()
                },
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated pending entry counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    configure_logging("WARNING", json=True, stream=sys.stderr)
    report = run([int(s) for s in args.sizes.split(",")], args.rounds, args.workdir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
