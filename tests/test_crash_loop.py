"""A crash loop with writes flowing: `kill -9` again and again, then one clean start delivers every ack once.

Each cycle starts gunicorn (two workers) on the same data directory, lets client
threads write `{"n": <unique marker>}` entries, and after a random number of
acknowledgements kills the master, a worker, or both with SIGKILL. Every cycle ends
with every process of that gunicorn gone. After the last cycle one more start must
deliver every acknowledged payload_id, and the destination must hold each exactly
once and nothing the client never sent.

The number of cycles comes from NEXUS_CRASH_CYCLES (30 by default) and the random
choices from NEXUS_CRASH_SEED, so a failure can be replayed and a long run made with
`bench/crash_loop.py --cycles 500`.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support.proc import (
    Gunicorn,
    Launcher,
    Ledger,
    ProcessTestError,
    Writers,
    count_rows,
    exactly_once_problems,
    is_alive,
    wait_delivered,
    wait_for,
)

pytestmark = pytest.mark.process

#: Cycles of start, write, kill; a longer mode sets more through the environment.
CYCLES = int(os.environ.get("NEXUS_CRASH_CYCLES", "30"))
#: Seeds every random choice (what to kill, when), so a failing run can be replayed.
SEED = int(os.environ.get("NEXUS_CRASH_SEED", "20261128"))
#: A kill comes after a random number of acknowledgements in this range: early enough
#: that requests are in flight, late enough that something was acknowledged.
ACKS_BEFORE_KILL = (10, 80)
#: Client threads writing at once.
WRITER_THREADS = 6
#: Markers of one cycle start at cycle * this, so every request's marker is unique.
MARKERS_PER_CYCLE = 1_000_000
#: Orphaned workers notice their master is gone within a second (gunicorn's notify
#: loop), then drain; past this they are killed and counted.
ORPHAN_EXIT_TIMEOUT = 30.0
#: The last start must replay and deliver everything the cycles left behind.
FINAL_DELIVERY_TIMEOUT = 120.0

KILLS = ("master", "worker", "both")


def kill_master_and_wait_for_orphans(server: Gunicorn) -> int:
    """`kill -9` the master only; its workers exit by themselves. Returns how many had to be killed."""
    workers = server.worker_pids()
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    try:
        wait_for(lambda: not any(is_alive(p) for p in workers), ORPHAN_EXIT_TIMEOUT, "orphaned workers to exit")
    except ProcessTestError:
        stuck = [p for p in workers if is_alive(p)]
        for pid in stuck:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(is_alive(p) for p in stuck), 10, "stuck orphans to die")
        return len(stuck)
    return 0


def run_cycle(server: Gunicorn, rng: random.Random, ledger: Ledger, cycle: int) -> tuple[str, int]:
    """Write until a random number of acks, then kill as `rng` decides; (what was killed, orphans killed)."""
    how = rng.choice(KILLS)
    writers = Writers(server.port, threads=WRITER_THREADS, ledger=ledger, first=cycle * MARKERS_PER_CYCLE)
    writers.start()
    orphans_killed = 0
    try:
        writers.wait_acked(ledger.acked_count + rng.randint(*ACKS_BEFORE_KILL))
        if how == "both":
            server.kill9_all()
        elif how == "master":
            orphans_killed = kill_master_and_wait_for_orphans(server)
        else:
            # One worker; the master respawns it while writes go on through the other ...
            server.kill9_worker(rng.choice(server.worker_pids()))
            writers.wait_acked(ledger.acked_count + rng.randint(*ACKS_BEFORE_KILL))
            # ... then the master and whatever workers it has, so the cycle ends with nothing alive.
            server.kill9_all()
    finally:
        writers.stop()
    return how, orphans_killed


def crash_loop_summary(ledger: Ledger, db_path: Path, cycles: int, kills: Counter[str], orphans: int) -> str:
    """The one line the CI log shows: what was acknowledged, stored, duplicated, stored without an ack."""
    counts = count_rows(db_path)
    rows = sum(counts.values())
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unacknowledged = sum(n for pid, n in counts.items() if pid not in ledger.acked)
    missing = sum(1 for pid in ledger.acked if pid not in counts)
    return (
        f"CRASH-LOOP: cycles={cycles} seed={SEED} acknowledged={len(ledger.acked)} delivered_rows={rows} "
        f"duplicates={duplicates} unacknowledged_but_stored={unacknowledged} missing={missing} "
        f"lost_responses={len(ledger.lost)} kills={dict(sorted(kills.items()))} orphans_killed={orphans}"
    )


class TestCrashLoop:
    """Promise 1 under repetition: no kill -9 of master or worker, at any moment, loses or duplicates an ack."""

    def test_kill9_crash_loop_under_writes_stores_every_ack_exactly_once(
        self, launch: Launcher, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Many starts, each killed with -9 mid-write (master, worker or both): a last start stores each ack once."""
        rng = random.Random(SEED)
        ledger = Ledger()
        kills: Counter[str] = Counter()
        orphans = 0
        # Given a data directory that lives through CYCLES crashes under continuous writes
        for cycle in range(CYCLES):
            server = launch(workers=2)
            server.wait_ready()
            how, killed = run_cycle(server, rng, ledger, cycle)
            kills[how] += 1
            orphans += killed
            assert not server.worker_pids(), f"cycle {cycle} left workers alive\n{server.log_tail()}"
        # When it starts once more and is stopped cleanly after delivering every ack
        final = launch(workers=2)
        final.wait_ready(timeout=60)
        wait_delivered(final.db_path, ledger.snapshot_acked(), timeout=FINAL_DELIVERY_TIMEOUT)
        code, _ = final.stop(signal.SIGTERM)
        summary = crash_loop_summary(ledger, final.db_path, CYCLES, kills, orphans)
        with capsys.disabled():
            sys.stdout.write(f"\n{summary}\n")
        # Then every ack is one row, nothing is stored twice, and every row is a marker the client sent
        assert code == 0, final.log_tail()
        problems = exactly_once_problems(ledger, final.db_path, responses_may_be_lost=True)
        assert problems == [], f"{summary}\n{len(problems)} problem(s), first ones: {problems[:20]}"
        assert ledger.acked, summary
