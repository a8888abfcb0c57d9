"""Secrets: token generation and secret files shared by racing workers; auth's token comparison."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from multiprocessing.queues import Queue as ProcessQueue
from multiprocessing.synchronize import Barrier as ProcessBarrier
from pathlib import Path

import pytest

from nexus_gevent.auth import tokens_equal
from nexus_gevent.errors import ConfigError
from nexus_gevent.secrets import generate_token, load_or_create_secret

RACERS = 8


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _race_in_process(path: str, barrier: ProcessBarrier, results: ProcessQueue[tuple[str, bool]]) -> None:
    barrier.wait()
    results.put(load_or_create_secret(Path(path)))


class TestGenerateToken:
    def test_tokens_are_url_safe_and_long(self) -> None:
        """A token is 43 URL-safe characters: 32 random bytes, base64url without padding."""
        token = generate_token()
        assert len(token) == 43
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

    def test_tokens_differ_between_calls(self) -> None:
        """Each call draws a fresh token."""
        assert len({generate_token() for _ in range(100)}) == 100


class TestTokensEqual:
    def test_equal_tokens_match(self) -> None:
        """Identical tokens compare equal."""
        assert tokens_equal("s3cret-token", "s3cret-token")

    def test_different_tokens_do_not_match(self) -> None:
        """Tokens differing in one character, or in length, do not compare equal."""
        assert not tokens_equal("s3cret-token", "s3cret-tokeN")
        assert not tokens_equal("s3cret-token", "s3cret-token-longer")
        assert not tokens_equal("s3cret-token", "")

    def test_non_ascii_input_is_compared_not_rejected(self) -> None:
        """A header value with non-ASCII text is simply unequal (compare_digest would raise on str)."""
        assert not tokens_equal("s3cret-token", "s3crét-token")
        assert tokens_equal("clé", "clé")


class TestLoadOrCreateSecret:
    def test_missing_file_is_generated_with_mode_0600(self, tmp_path: Path) -> None:
        """A missing secret file is created, readable by its owner only, and reported as created."""
        path = tmp_path / "secrets" / "admin-token"

        token, created = load_or_create_secret(path)

        assert created
        assert path.read_text() == token + "\n"
        assert _mode(path) == 0o600

    def test_missing_parent_directory_is_created_with_mode_0700(self, tmp_path: Path) -> None:
        """The directory that will hold the secret is created private."""
        path = tmp_path / "secrets" / "token-default"

        load_or_create_secret(path)

        assert _mode(path.parent) == 0o700

    def test_mode_ignores_a_permissive_umask(self, tmp_path: Path) -> None:
        """The file and directory modes are exact even under umask 000."""
        old = os.umask(0)
        try:
            path = tmp_path / "secrets" / "token"
            load_or_create_secret(path)
        finally:
            os.umask(old)
        assert _mode(path) == 0o600
        assert _mode(path.parent) == 0o700

    def test_existing_file_is_reused(self, tmp_path: Path) -> None:
        """The second call returns the first call's token and reports it as not created."""
        path = tmp_path / "token"
        first, _ = load_or_create_secret(path)

        second, created = load_or_create_secret(path)

        assert second == first
        assert not created

    def test_operator_written_file_loses_only_its_trailing_newline(self, tmp_path: Path) -> None:
        """A token file written by hand (echo > file) is read without its line ending."""
        path = tmp_path / "token"
        path.write_text("hand-made-token\r\n")

        assert load_or_create_secret(path) == ("hand-made-token", False)

    def test_empty_file_is_a_config_error(self, tmp_path: Path) -> None:
        """An empty secret file is refused with its path, not silently replaced or accepted."""
        path = tmp_path / "token"
        path.write_text("\n")

        with pytest.raises(ConfigError, match=str(path)):
            load_or_create_secret(path)

    def test_no_temporary_files_are_left_behind(self, tmp_path: Path) -> None:
        """Only the secret itself remains in its directory after creation."""
        path = tmp_path / "secrets" / "token"

        load_or_create_secret(path)

        assert [p.name for p in path.parent.iterdir()] == ["token"]

    def test_racing_processes_agree_on_one_token(self, tmp_path: Path) -> None:
        """Workers creating the same secret at once all get the token that exactly one created."""
        # Given: several processes released at the same moment
        path = tmp_path / "secrets" / "token-default"
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(RACERS)
        results: ProcessQueue[tuple[str, bool]] = ctx.Queue()
        procs = [ctx.Process(target=_race_in_process, args=(str(path), barrier, results)) for _ in range(RACERS)]
        # When: each loads-or-creates the secret
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        # Then: one token, one creator, and it is the one on disk
        assert {token for token, _ in outcomes} == {path.read_text().strip()}
        assert sum(created for _, created in outcomes) == 1
        assert all(proc.exitcode == 0 for proc in procs)

    def test_racing_threads_agree_on_one_token(self, tmp_path: Path) -> None:
        """Threads creating the same secret at once all get one token, created once."""
        path = tmp_path / "secrets" / "token-default"
        barrier = threading.Barrier(RACERS)
        outcomes: list[tuple[str, bool]] = []
        lock = threading.Lock()

        def race() -> None:
            barrier.wait()
            outcome = load_or_create_secret(path)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=race) for _ in range(RACERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert len(outcomes) == RACERS
        assert len({token for token, _ in outcomes}) == 1
        assert sum(created for _, created in outcomes) == 1
