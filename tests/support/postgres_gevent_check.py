"""Run in a subprocess: is the PostgreSQL destination cooperative under gevent?

Usage: python -m tests.support.postgres_gevent_check URL [--import-psycopg-first]

Patches first, as a gunicorn gevent worker does, then imports the destination, runs
CONCURRENT greenlets each holding one pooled connection through `SELECT pg_sleep(SLEEP)`,
while a ticker greenlet sleeps TICK at a time and records the longest gap between its
ticks. Prints one JSON object: {"elapsed", "ticks", "max_gap"}, or {"error"} when the
destination refused to be built. With --import-psycopg-first, psycopg is imported before
patching: the import-order trap that the destination must refuse.
"""

from __future__ import annotations

import sys

if "--import-psycopg-first" in sys.argv:
    import psycopg  # noqa: F401 - the trap under test: imported before patching

from gevent import monkey  # type: ignore[import-untyped, unused-ignore]

monkey.patch_all()

import json  # noqa: E402 - everything after patch_all(), as in a worker
import time  # noqa: E402

import gevent  # type: ignore[import-untyped, unused-ignore]  # noqa: E402

from nexus_gevent.destinations.postgres import PostgresDestination  # noqa: E402
from nexus_gevent.errors import ConfigError  # noqa: E402

CONCURRENT = 5
SLEEP = 0.5
TICK = 0.01


def main(url: str) -> dict[str, object]:
    try:
        dest = PostgresDestination("gevent-check", url, pool_min=CONCURRENT, pool_max=CONCURRENT)
    except ConfigError as exc:
        return {"error": str(exc)}
    try:

        def run(sql: str) -> None:
            with dest._connection() as conn:
                conn.execute(sql.encode()).fetchall()

        # Warm up: every connection of the pool open and the schema ready, so the
        # measurement below is only the sleeping queries.
        gevent.joinall([gevent.spawn(run, "SELECT 1") for _ in range(CONCURRENT)], raise_error=True)

        gaps: list[float] = []
        stop = False

        def ticker() -> None:
            last = time.monotonic()
            while not stop:
                gevent.sleep(TICK)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = gevent.spawn(ticker)
        started = time.monotonic()
        sleepers = [gevent.spawn(run, f"SELECT pg_sleep({SLEEP})") for _ in range(CONCURRENT)]
        gevent.joinall(sleepers, raise_error=True)
        elapsed = time.monotonic() - started
        stop = True
        tick.join()
        return {"elapsed": elapsed, "ticks": len(gaps), "max_gap": max(gaps, default=elapsed)}
    finally:
        dest.close()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
