"""Power cuts, not just kill -9: an acknowledgement means the bytes were on the disk.

The whole data directory (WAL, SQLite destination, idempotency index, dead-letter store,
secrets, rate-limit and resend-hint maps) lives on the lazy FUSE file system of
tests/support/lazyfs_server.py, which keeps every write that was not fsynced, and every
name whose directory was not fsynced, in memory only. Each cycle starts gunicorn (two
workers), writes from several threads (single entries, batches, some with an
Idempotency-Key), kills -9 every process at a random moment and then cuts the power:
the file system forgets all that was not durable. In some cycles the cut comes while
the file system holds a WAL write torn short (a torn tail) or a destination commit's
fsync (before or after it is durable). The next start runs on what remains.

Checked, row by row, after the last cycle: every acknowledged payload_id (202, durable
429) is stored exactly once and no row holds anything the client did not send; after
every cut, no DELIVERED mark on disk names an entry whose row is not on disk, each
idempotency key answered before it is still answered as a duplicate with the same ids,
the generated admin token is the same, and the service starts (a torn WAL tail is
skipped and counted, never fatal).

NEXUS_POWER_CUT_CYCLES sets the cycles (CI: a few), NEXUS_POWER_CUT_SEED the random
choices; `bench/power_cut.py --cycles 1000` is the long mode.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nexus_gevent.wal import records
from nexus_gevent.wal._frame import Frame
from nexus_gevent.wal.fold import DELIVERED, Fold
from nexus_gevent.wal.segments import list_segments, read_segment
from tests.support.lazyfs import LazyMount, require_fuse
from tests.support.proc import (
    Gunicorn,
    KeepAlive,
    Launcher,
    Ledger,
    count_rows,
    exchange,
    is_alive,
    post_headers,
    row_problems,
    stored_markers,
    wait_delivered,
    wait_for,
)

pytestmark = [pytest.mark.process, pytest.mark.fuse]

#: Cycles of start, write, kill -9, power cut; the long mode sets more through the environment.
CYCLES = int(os.environ.get("NEXUS_POWER_CUT_CYCLES", "15"))
#: A time box for the long mode: no cycle starts after this many seconds (0: none).
CYCLE_SECONDS = float(os.environ.get("NEXUS_POWER_CUT_SECONDS", "0"))
#: Seeds every random choice (when to cut, what each writer sends), so a failing run can be replayed.
SEED = int(os.environ.get("NEXUS_POWER_CUT_SEED", "20261207"))
#: The cut comes after a random number of acknowledged entries in this range.
ACKS_BEFORE_CUT = (5, 60)
WRITER_THREADS = 4
#: Markers of one cycle start at cycle * this, so every entry's marker is unique.
MARKERS_PER_CYCLE = 1_000_000
#: A batch holds this many entries at most.
MAX_BATCH = 5
#: When each cycle's cut comes: at once, or while the file system holds a WAL write torn
#: short (a torn tail), or a destination commit's fsync before or after it is durable.
CUTS = ("now", "now", "torn-wal-write", "commit-before", "commit-after")
#: Keys answered before older cuts are re-checked by sample; those of the last cycle all.
OLD_KEYS_CHECKED = 20
#: The ordering test holds a destination commit only after this many rows were delivered.
ROWS_BEFORE_HOLD = 100
#: Everything on FUSE in Python is slow; these bound a stalled start, not a normal one.
START_TIMEOUT = 120.0
ACK_TIMEOUT = 120.0
FINAL_DELIVERY_TIMEOUT = 180.0

#: What the service must find on the mount: generated tokens, rate-limit maps, a small queue (durable 429s).
SERVICE_ENV = {
    "NEXUS_ADMIN_TOKEN": "",
    "NEXUS_RATE_LIMIT_PER_SECOND": "1000000",
    "NEXUS_QUEUE_SIZE": "8",
}


@dataclass
class Keys:
    """Idempotency keys the service answered: key -> (the body sent, the payload_ids answered)."""

    answered: dict[str, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, key: str, body: bytes, payload_ids: tuple[str, ...]) -> None:
        with self.lock:
            self.answered[key] = (body, payload_ids)

    def snapshot(self) -> dict[str, tuple[bytes, tuple[str, ...]]]:
        with self.lock:
            return dict(self.answered)


class MixedWriters:
    """Threads that POST single entries and batches, some with an Idempotency-Key, until stopped."""

    def __init__(self, port: int, ledger: Ledger, keys: Keys, *, first: int, seed: int) -> None:
        self.port, self.ledger, self.keys = port, ledger, keys
        self._numbers = itertools.count(first)
        self._numbers_lock = threading.Lock()
        self._seed = seed
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="power-cut-writer")
        self._futures: list[Future[None]] = []

    def start(self) -> None:
        self._futures = [self._pool.submit(self._run, self._seed * 100 + i) for i in range(WRITER_THREADS)]

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(60)
        self._pool.shutdown(wait=True)

    def wait_acked(self, count: int) -> None:
        wait_for(
            lambda: self.ledger.acked_count >= count,
            ACK_TIMEOUT,
            f"{count} acknowledged entries",
            describe=lambda: f"outcomes so far: {dict(self.ledger.outcomes)}",
        )

    def _take(self, count: int) -> list[int]:
        with self._numbers_lock:
            return [next(self._numbers) for _ in range(count)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with contextlib.closing(KeepAlive(self.port)) as client:
            while not self._stop.is_set():
                batch = rng.random() < 0.25
                markers = self._take(rng.randint(2, MAX_BATCH) if batch else 1)
                elements = [{"n": n} for n in markers]
                body = json.dumps(elements if batch else elements[0]).encode()
                headers = post_headers()
                key = f"pc-{markers[0]}" if rng.random() < 0.3 else None
                if key is not None:
                    headers["Idempotency-Key"] = key
                for n in markers:
                    self.ledger.record_sent(n)
                try:
                    response = client.post("/inbound/default", body, headers)
                except OSError as exc:
                    for n in markers:
                        self.ledger.record_lost(n, exc)
                    # Not a synchronisation: a pause so a dead port is not hammered.
                    self._stop.wait(0.01)
                    continue
                except Exception as exc:
                    for n in markers:
                        self.ledger.record_lost(n, exc)
                    self._stop.wait(0.01)
                    continue
                ids = self.ledger.record_answer(markers, response.status, response.body)
                if key is not None and ids and response.status in (200, 202, 429):
                    self.keys.record(key, body, ids)


def duplicate_problems(port: int, keys: dict[str, tuple[bytes, tuple[str, ...]]]) -> list[str]:
    """Resend each key's body: each must be 200 duplicate naming the same payload_ids."""
    problems: list[str] = []
    for key, (body, ids) in keys.items():
        headers = {**post_headers(), "Idempotency-Key": key}
        response = exchange(port, "POST", "/inbound/default", body=body, headers=headers, timeout=30.0)
        data = response.json() if response.body.startswith(b"{") else {}
        answered = tuple(data.get("payload_ids", [data.get("payload_id")]))
        if response.status != 200 or data.get("status") != "duplicate" or answered != ids:
            problems.append(f"key {key}: {response.status} {response.body[:200]!r}, expected duplicate of {ids}")
    return problems


def durable_marks(data_dir: Path) -> set[str]:
    """payload_ids a DELIVERED mark ends in the WAL on disk, every worker directory read offline."""
    delivered: set[str] = set()
    for directory in sorted((data_dir / "wal").glob("w*")):
        fold: Fold[int] = Fold(keep_ended=True)
        for _number, path in list_segments(directory):
            for item in read_segment(path):
                if not isinstance(item, Frame):
                    continue  # a damaged run: replay skips it too
                if item.kind == records.ENTRY:
                    fold.entry(records.decode_entry(item.body).payload_id, 0)
                else:
                    with contextlib.suppress(ValueError):
                        fold.mark(item.kind, item.body)
        assert fold.ended is not None
        delivered.update(pid for pid, status in fold.ended.items() if status == DELIVERED)
    return delivered


def cut_while(how: str, server: Gunicorn, lazy: LazyMount) -> None:
    """Kill every process and cut the power now, or while the file system holds the call `how` names."""
    if how == "now":
        server.kill9_all()
        lazy.cut()
        return
    if how == "torn-wal-write":
        lazy.tear_write(".wal")
    else:
        lazy.pause_fsync("nexus.db-wal", how.removeprefix("commit-"))
    wait_for(lambda: lazy.paused() > 0, ACK_TIMEOUT, f"the file system to hold a call ({how})")
    kill_all_during_a_hold(server, lazy)


def kill_all_during_a_hold(server: Gunicorn, lazy: LazyMount) -> None:
    """kill -9 every process and cut the power while the file system holds one of their calls.

    kill -9 cannot end a process inside a held call (the kernel waits for the file
    system's answer): signal them all, cut (which lets the held call fail), then reap.
    """
    doomed = [server.pid, *server.worker_pids()]
    for pid in doomed:
        # A worker may have exited since it was listed: it is as dead as the cut wants it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    lazy.cut()
    server.proc.wait(30)
    wait_for(lambda: not any(is_alive(pid) for pid in doomed), 30, "killed workers to disappear")


@dataclass
class PowerCutRun:
    """One data directory on a lazy mount, and what every cycle on it acknowledged."""

    lazy: LazyMount
    launch: Launcher
    ledger: Ledger = field(default_factory=Ledger)
    keys: Keys = field(default_factory=Keys)
    starts: int = 0
    damaged_starts: int = 0
    damaged_runs: int = 0
    admin_token: str | None = None
    cuts: Counter[str] = field(default_factory=Counter)
    #: Keys already resent after a cut; older ones are checked again by sample.
    keys_checked: dict[str, tuple[bytes, tuple[str, ...]]] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.lazy.mountpoint / "data"

    def start(self) -> Gunicorn:
        """Start gunicorn on the mount and wait until both workers replayed; count the damage they skipped."""
        server = self.launch(workers=2, env=SERVICE_ENV, data_dir=self.data_dir)
        server.wait_ready(timeout=START_TIMEOUT)
        self.starts += 1
        damaged = sum(int(event.get("damaged", 0)) for event in server.events("wal_replayed"))
        self.damaged_runs += damaged
        self.damaged_starts += damaged > 0
        token = (self.data_dir / "secrets" / "admin-token").read_text().strip()
        if self.admin_token is None:
            self.admin_token = token
        assert token == self.admin_token, "the generated admin token changed across a power cut"
        return server

    def check_keys(self, server: Gunicorn, when: str, rng: random.Random | None = None) -> None:
        """Every key not checked yet, and (given `rng`) a sample of older ones, is a duplicate of the same ids."""
        fresh = {k: v for k, v in self.keys.snapshot().items() if k not in self.keys_checked}
        old = {}
        if rng is not None:
            checked = self.keys_checked
            old = dict(rng.sample(sorted(checked.items()), min(OLD_KEYS_CHECKED, len(checked))))
        problems = duplicate_problems(server.port, {**fresh, **old})
        assert problems == [], f"{when}: {problems[:10]}\n{server.log_tail()}"
        self.keys_checked.update(fresh)

    def summary(self, cycles: int, db_path: Path) -> str:
        counts = count_rows(db_path)
        duplicates = sum(n - 1 for n in counts.values() if n > 1)
        missing = sum(1 for pid in self.ledger.acked if pid not in counts)
        return (
            f"POWER-CUT: cycles={cycles} seed={SEED} acknowledged={len(self.ledger.acked)} "
            f"stored_rows={sum(counts.values())} missing={missing} duplicates={duplicates} "
            f"keys_checked={len(self.keys_checked)} starts={self.starts} damaged_starts={self.damaged_starts} "
            f"damaged_runs={self.damaged_runs} lost_responses={len(self.ledger.lost)} "
            f"cuts={dict(sorted(self.cuts.items()))} "
            f"outcomes={dict(sorted(self.ledger.outcomes.items()))}"
        )


@pytest.fixture
def run(tmp_path: Path) -> Iterator[PowerCutRun]:
    """A lazy mount under tmp_path and a launcher for gunicorns on it; all stopped at the end."""
    require_fuse()
    lazy = LazyMount(tmp_path / "fs")
    lazy.base.mkdir()
    lazy.start()
    launcher = Launcher(tmp_path)
    try:
        yield PowerCutRun(lazy, launcher)
    finally:
        launcher.cleanup()
        lazy.stop()


def finish(run: PowerCutRun, cycles: int, capsys: pytest.CaptureFixture[str]) -> Gunicorn:
    """One last start delivers every ack, each stored exactly once and nothing else; every key is a duplicate."""
    final = run.start()
    # Keys answered before the last cut were not resent yet.
    run.check_keys(final, "after the last cut")
    db_path = final.db_path
    wait_delivered(db_path, run.ledger.snapshot_acked(), timeout=FINAL_DELIVERY_TIMEOUT)
    code, _ = final.stop(signal.SIGTERM)
    summary = run.summary(cycles, db_path)
    with capsys.disabled():
        sys.stdout.write(f"\n{summary}\n")
    assert code == 0, final.log_tail()
    problems = row_problems(run.ledger, stored_markers(db_path), responses_may_be_lost=True)
    assert problems == [], f"{summary}\n{len(problems)} problem(s), first ones: {problems[:20]}"
    assert run.ledger.acked, summary
    return final


class TestPowerCutLoop:
    """Promise 1 under power loss: what was acknowledged was on the disk, whatever else was lost."""

    def test_power_cuts_under_writes_lose_no_ack_and_forget_no_idempotency_key(
        self, run: PowerCutRun, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """kill -9 of every process plus a power cut, again and again: every ack is stored once, every key kept."""
        rng = random.Random(SEED)
        # Its own generator: how many keys the sample draws from depends on timing, and must
        # not shift the seed's choice of each cut.
        sample_rng = random.Random(SEED + 1)
        deadline = time.monotonic() + CYCLE_SECONDS if CYCLE_SECONDS > 0 else None
        cycles = 0
        for cycle in range(CYCLES):
            if deadline is not None and time.monotonic() > deadline:
                break
            cycles += 1
            # Given the service started on what the last cut left
            server = run.start()
            # Then every key answered before the cut is still a duplicate of the same ids
            run.check_keys(server, f"cycle {cycle}", sample_rng)
            # When writes flow and, at a random moment, every process dies and the power is cut
            writers = MixedWriters(
                server.port, run.ledger, run.keys, first=(cycle + 1) * MARKERS_PER_CYCLE, seed=SEED + cycle
            )
            writers.start()
            how = rng.choice(CUTS)
            try:
                writers.wait_acked(run.ledger.acked_count + rng.randint(*ACKS_BEFORE_CUT))
                cut_while(how, server, run.lazy)
            finally:
                writers.stop()
            run.cuts[how] += 1
            run.lazy.remount()
            # And no DELIVERED mark outlived its row
            orphaned = sorted(durable_marks(run.data_dir) - set(count_rows(server.db_path)))
            assert not orphaned, f"cycle {cycle} ({how}): DELIVERED marks durable without their row: {orphaned[:5]}"
        # Then a last start stores every ack exactly once
        finish(run, cycles, capsys)


class TestOrderOfDurability:
    """A DELIVERED mark is never durable while its row is not (the contract's destination-table rule)."""

    @pytest.mark.parametrize("when", ["before", "after"])
    def test_a_cut_at_the_destination_commit_leaves_no_mark_without_its_row(
        self, run: PowerCutRun, when: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Cut while a destination commit's fsync is held (before or after it is durable): no mark outruns its row.

        The file system holds the next fsync of nexus.db-wal, the destination's commit in
        WAL mode, either before it makes the commit durable or just after; every process
        is then killed and the power cut. Read offline, every DELIVERED mark in the WAL
        must name a row the destination holds; the next start then stores every ack once.
        """
        # Given writes flowing with deliveries committed
        server = run.start()
        writers = MixedWriters(server.port, run.ledger, run.keys, first=MARKERS_PER_CYCLE, seed=SEED)
        writers.start()
        try:
            writers.wait_acked(ROWS_BEFORE_HOLD)
            # Enough commits that earlier ones have their marks written: the check must see some.
            wait_for(lambda: len(count_rows(server.db_path)) >= ROWS_BEFORE_HOLD, ACK_TIMEOUT, "rows delivered")
            # When the next destination commit's fsync is held, and everything dies while it is
            run.lazy.pause_fsync("nexus.db-wal", when)
            wait_for(lambda: run.lazy.paused() > 0, ACK_TIMEOUT, f"a destination fsync held {when} it is durable")
            kill_all_during_a_hold(server, run.lazy)
        finally:
            writers.stop()
        run.lazy.remount()
        # Then no DELIVERED mark on disk names an entry whose row is not on disk
        marks = durable_marks(run.data_dir)
        rows = set(count_rows(server.db_path))
        assert marks, "no DELIVERED mark was durable: the check saw nothing"
        orphaned = sorted(marks - rows)
        assert not orphaned, f"{len(orphaned)} DELIVERED mark(s) durable without their row: {orphaned[:5]}"
        # And a start stores every ack exactly once
        finish(run, 1, capsys)


class TestTornWalWrite:
    """Promise 2 under power loss: a WAL write torn by the cut is skipped and counted, and the service starts."""

    def test_a_cut_in_the_middle_of_a_wal_write_is_skipped_and_counted_at_the_next_start(
        self, run: PowerCutRun, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A WAL batch short of its last byte is on disk at the cut: the next start counts it, stores every ack."""
        # Given writes flowing
        server = run.start()
        writers = MixedWriters(server.port, run.ledger, run.keys, first=MARKERS_PER_CYCLE, seed=SEED)
        writers.start()
        try:
            writers.wait_acked(20)
            # When the power fails in the middle of the next WAL write, with everything killed
            run.lazy.tear_write(".wal")
            wait_for(lambda: run.lazy.paused() > 0, ACK_TIMEOUT, "a WAL write torn by the cut")
            kill_all_during_a_hold(server, run.lazy)
        finally:
            writers.stop()
        run.lazy.remount()
        # Then the next start skips the torn record, counts and logs it, and stores every ack once
        final = finish(run, 1, capsys)
        assert run.damaged_starts == 1, "the torn tail was not counted by the replay"
        assert final.events("wal_damage_skipped"), final.log_tail()
