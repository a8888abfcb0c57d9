"""Real gunicorn processes: what a signal, a crash or a worker recycle does to acknowledged entries.

Every test writes through real HTTP connections from OS threads, records each
payload_id the service acknowledged (a 202, or a 429 carrying a payload_id), and
checks the SQLite destination row by row: each acknowledged entry stored exactly
once, and no row the client did not send.
"""

from __future__ import annotations

import http.client
import signal

import pytest

from tests.support.proc import (
    HOST,
    Gunicorn,
    Launcher,
    Ledger,
    Writers,
    count_rows,
    exactly_once_problems,
    has_loaded,
    post_headers,
    wait_delivered,
    wait_for,
)

pytestmark = pytest.mark.process

#: gunicorn.conf.py: graceful_timeout = drain timeout (10 s in these tests) + 10 s.
GRACEFUL_TIMEOUT = 20.0
#: Client threads writing at once.
WRITER_THREADS = 8
#: Acknowledged writes before the signal or the kill, so that there is something to lose.
ACKS_BEFORE_KILL = 300

#: Worker recycles (max_requests) the recycling test waits for.
RECYCLES = 4


def drained_workers(server: Gunicorn) -> dict[int, bool]:
    """Worker pid -> drained, from the workers' drain_finished lines.

    Keyed by process, not by WAL directory: a replacement worker may take the very
    directory a stopping worker has just released, so two drains can name one directory.
    """
    return {int(e["pid"]): bool(e["drained"]) for e in server.events("drain_finished")}


def assert_both_workers_drained(server: Gunicorn) -> None:
    drained = drained_workers(server)
    assert len(drained) == 2, server.log_tail()
    assert all(drained.values()), server.log_tail()


def assert_exactly_once(ledger: Ledger, server: Gunicorn, *, responses_may_be_lost: bool = False) -> None:
    problems = exactly_once_problems(ledger, server.db_path, responses_may_be_lost=responses_may_be_lost)
    assert problems == [], (
        f"{len(problems)} problem(s), first ones: {problems[:20]}\noutcomes: {dict(ledger.outcomes)}\n"
        f"log tail:\n{server.log_tail()}"
    )


def restart_and_stop(launch: Launcher, ledger: Ledger) -> Gunicorn:
    """Start again on the same data dir, wait until replay delivered every ack, and SIGTERM it."""
    server = launch()
    server.wait_ready()
    wait_delivered(server.db_path, ledger.snapshot_acked(), timeout=30)
    code, _ = server.stop(signal.SIGTERM)
    assert code == 0, server.log_tail()
    return server


class TestGracefulStop:
    """SIGTERM, SIGINT and max_requests: the workers drain before they exit."""

    def test_sigterm_during_writes_delivers_every_acknowledged_entry_exactly_once(self, launch: Launcher) -> None:
        """SIGTERM while 8 threads write 1,000 entries: the master exits 0, both workers drain, each ack is one row."""
        # Given two workers taking writes from eight threads
        server = launch()
        server.wait_ready()
        writers = Writers(server.port, threads=WRITER_THREADS, total=1000)
        writers.start()
        # When the master gets SIGTERM halfway through
        writers.wait_acked(500)
        code, _ = server.stop(signal.SIGTERM)
        writers.join()
        # Then it exits cleanly, each worker logged its drain, and every ack is stored once
        assert code == 0, server.log_tail()
        assert_both_workers_drained(server)
        assert_exactly_once(writers.ledger, server)
        # ... and a restart finds nothing PENDING that was never acknowledged
        assert_exactly_once(writers.ledger, restart_and_stop(launch, writers.ledger))

    def test_sigterm_with_idle_keepalive_connections_still_drains_promptly(self, launch: Launcher) -> None:
        """SIGTERM with idle keep-alive connections open: workers close them, drain and exit before graceful_timeout."""
        # Given entries written over keep-alive connections that stay open and idle
        server = launch()
        server.wait_ready()
        ledger = Ledger()
        idle = [http.client.HTTPConnection(HOST, server.port, timeout=30) for _ in range(6)]
        try:
            for n, conn in enumerate(idle):
                conn.request("POST", "/inbound/default", body=f'{{"n": {n}}}'.encode(), headers=post_headers())
                ledger.record_sent(n)
                response = conn.getresponse()
                ledger.record_response(n, response.status, response.read())
            assert ledger.acked_count == len(idle)
            # When the master gets SIGTERM
            code, seconds = server.stop(signal.SIGTERM)
        finally:
            for conn in idle:
                conn.close()
        # Then the workers did not wait out graceful_timeout (and get SIGKILLed mid-drain)
        assert code == 0, server.log_tail()
        assert seconds < GRACEFUL_TIMEOUT / 2, f"took {seconds:.1f} s\n{server.log_tail()}"
        assert_both_workers_drained(server)
        assert_exactly_once(ledger, server)

    def test_sigterm_while_a_worker_boots_is_not_lost(self, launch: Launcher) -> None:
        """SIGTERM while a replacement worker is still booting: it stops and drains too, before graceful_timeout."""
        # Given two workers with delivered entries, one of which is killed
        server = launch()
        server.wait_ready()
        with Writers(server.port, threads=WRITER_THREADS, total=200) as writers:
            writers.join()
        survivor, victim = server.worker_pids()
        server.kill9_worker(victim)
        # When the master gets SIGTERM as soon as it has forked the replacement
        # (gunicorn installs the worker's own signal handlers only after monkey-patching)
        wait_for(lambda: set(server.worker_pids()) - {survivor}, 10, "a replacement worker", interval=0.002)
        code, seconds = server.stop(signal.SIGTERM)
        # Then the replacement did not ignore it and wait for the master's SIGKILL
        assert code == 0, server.log_tail()
        assert seconds < GRACEFUL_TIMEOUT / 2, f"took {seconds:.1f} s\n{server.log_tail()}"
        assert_both_workers_drained(server)
        # ... and what the victim left behind is delivered by the next start, once
        assert_exactly_once(writers.ledger, restart_and_stop(launch, writers.ledger))

    def test_sigterm_while_a_worker_imports_the_app_is_not_lost(self, launch: Launcher) -> None:
        """SIGTERM while a replacement worker imports wsgi.py: it boots, drains and exits, and the master exits 0."""
        # Given two workers, one of which is killed
        server = launch()
        server.wait_ready()
        survivor, victim = server.worker_pids()
        server.kill9_worker(victim)
        newcomer = wait_for(
            lambda: sorted(set(server.worker_pids()) - {survivor}), 10, "a replacement worker", interval=0.002
        )[0]
        # When the master gets SIGTERM while the replacement imports the app (sqlite3 is
        # loaded by that import only: the master never imports it)
        wait_for(lambda: has_loaded(newcomer, "_sqlite3"), 10, "the app import", interval=0.001)
        code, seconds = server.stop(signal.SIGTERM)
        # Then the half-imported app did not turn the signal into a failed boot
        assert "Worker failed to boot" not in server.log_text(), server.log_tail()
        assert code == 0, server.log_tail()
        assert seconds < GRACEFUL_TIMEOUT / 2, f"took {seconds:.1f} s\n{server.log_tail()}"
        assert_both_workers_drained(server)

    def test_sigint_drains_through_the_worker_exit_backstop(self, launch: Launcher) -> None:
        """SIGINT to the master (workers get SIGQUIT): worker_exit drains, and the restart delivers the rest, once."""
        # Given two workers taking writes
        server = launch()
        server.wait_ready()
        writers = Writers(server.port, threads=WRITER_THREADS, total=800)
        writers.start()
        # When the master gets SIGINT mid-stream
        writers.wait_acked(ACKS_BEFORE_KILL)
        code, _ = server.stop(signal.SIGINT)
        writers.join()
        # Then both workers drained on their way out, without a restart ...
        assert code == 0, server.log_tail()
        assert_both_workers_drained(server)
        # ... all but the requests still in flight when the drain began (SIGQUIT does not
        # wait for them): acknowledged, they stay PENDING for the next owner of the WAL
        left = writers.ledger.acked.keys() - count_rows(server.db_path).keys()
        assert len(left) <= WRITER_THREADS, f"{len(left)} acknowledged entries left to the restart"
        # ... which delivers them: every ack exactly once, and nothing unacknowledged
        assert_exactly_once(writers.ledger, restart_and_stop(launch, writers.ledger))

    def test_max_requests_recycling_delivers_every_acknowledged_entry_exactly_once(self, launch: Launcher) -> None:
        """Workers recycled every 50 requests under continuous writes: each recycle drains, each ack is one row."""
        # Given two workers that restart themselves after 50 requests
        server = launch(env={"NEXUS_MAX_REQUESTS": "50"})
        server.wait_ready()
        # When at least 500 entries are written while at least 4 workers recycle
        # (gunicorn notices max_requests in a 1 s loop, so a burst alone recycles nobody)
        with Writers(server.port, threads=WRITER_THREADS) as writers:
            writers.wait_acked(500)
            wait_for(
                lambda: len(server.events("drain_finished")) >= RECYCLES,
                60,
                f"{RECYCLES} recycled workers",
                describe=server.log_tail,
            )
        code, _ = server.stop(signal.SIGTERM)
        # Then every worker that started also drained, fully, and every ack is stored once
        assert code == 0, server.log_tail()
        drains = server.events("drain_finished")
        assert len(drains) == len(server.events("worker_started")) > RECYCLES, server.log_tail()
        assert all(d["drained"] for d in drains), server.log_tail()
        assert_exactly_once(writers.ledger, server)
        assert_exactly_once(writers.ledger, restart_and_stop(launch, writers.ledger))


class TestCrash:
    """kill -9: whatever was acknowledged is delivered by whoever takes the WAL directory over."""

    @pytest.mark.parametrize("round_", range(5))
    def test_kill9_of_master_and_workers_then_restart_delivers_every_ack_exactly_once(
        self, launch: Launcher, round_: int
    ) -> None:
        """kill -9 of the master and both workers mid-write, then a restart: every ack is stored once, nothing else."""
        # Given two workers under continuous writes
        first = launch()
        first.wait_ready()
        writers = Writers(first.port, threads=WRITER_THREADS)
        writers.start()
        try:
            # When everything is killed with SIGKILL while writes are in flight (a different moment each round)
            writers.wait_acked(ACKS_BEFORE_KILL + 100 * round_)
            first.kill9_all()
        finally:
            writers.stop()
        acked = writers.ledger.snapshot_acked()
        # Then a restart on the same data dir replays both WAL directories and delivers every ack
        second = launch()
        second.wait_ready()
        wait_delivered(second.db_path, acked, timeout=60)
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0, second.log_tail()
        # ... exactly once; rows without an ack are only requests whose response the kill lost
        assert_exactly_once(writers.ledger, second, responses_may_be_lost=True)

    def test_worker_killed_alone_is_replaced_and_its_wal_delivered(self, launch: Launcher) -> None:
        """kill -9 of one worker: the master's replacement takes its WAL directory over and delivers it, once."""
        # Given two workers under continuous writes
        server = launch()
        server.wait_ready()
        with Writers(server.port, threads=WRITER_THREADS) as writers:
            writers.wait_acked(ACKS_BEFORE_KILL)
            victim = server.worker_pids()[0]
            wal_dir = server.wal_dir_of(victim)
            assert wal_dir is not None
            # When one worker is killed with SIGKILL
            server.kill9_worker(victim)
            # Then a new worker replays that very directory (its flock died with the victim) ...
            wait_for(
                lambda: len([e for e in server.events("wal_replayed") if e.get("wal_dir") == wal_dir.name]) >= 2,
                30,
                f"a replacement worker to replay {wal_dir.name}",
                describe=server.log_tail,
            )
            server.wait_ready(booted=3)
            # ... and writes go on through it
            writers.wait_acked(writers.ledger.acked_count + 200)
        # ... and every ack reaches the destination without a restart, exactly once
        wait_delivered(server.db_path, writers.ledger.snapshot_acked(), timeout=60)
        code, _ = server.stop(signal.SIGTERM)
        assert code == 0, server.log_tail()
        assert victim not in server.worker_pids()
        assert count_rows(server.db_path)
        assert_exactly_once(writers.ledger, server, responses_may_be_lost=True)
