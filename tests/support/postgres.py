"""A real PostgreSQL for tests: an outside server named by URL, or a private one started here.

- ``NEXUS_TEST_POSTGRES_URL`` set: tests use that server (an admin URL: it must be allowed to
  CREATE DATABASE). It cannot be stopped or started from here, so outage tests skip.
- Otherwise a private server is started from the installed binaries (``initdb`` on PATH or
  under /usr/lib/postgresql/*/bin) in a temporary directory, on a free port of 127.0.0.1,
  with fsync off, and stopped at the end of the session. initdb refuses to run as root, so
  as root every server command runs as the ``postgres`` OS user.
- Neither available: the tests skip, unless ``NEXUS_TEST_REQUIRE_SERVICES=1``, where they fail.

Use the fixtures by loading this module as a plugin, in a test module or the root conftest::

    pytest_plugins = ["tests.support.postgres"]
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.services import free_port, skip_or_fail

URL_ENV = "NEXUS_TEST_POSTGRES_URL"
#: initdb's superuser, and the OS user server commands run as when we are root.
SUPERUSER = "postgres"
OS_USER = "postgres"
#: How long a server may take to start or stop: far above a healthy few hundred ms.
SERVER_TIMEOUT = 60
#: Server settings for test speed. Durability is not under test against a private server:
#: fsync=off keeps a test session's commits from waiting on the disk.
FAST_SETTINGS = ("fsync=off", "full_page_writes=off")
_DBNAME = re.compile(r"[a-z_][a-z0-9_]*")


class PostgresUnavailable(Exception):
    """No PostgreSQL can be had for tests; the message says why."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        resolved = Path(on_path).resolve().parent
        if (resolved / "pg_ctl").exists():
            return resolved
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    for initdb in reversed(candidates):
        if (initdb.parent / "pg_ctl").exists():
            return initdb.parent
    return None


def with_dbname(url: str, dbname: str) -> str:
    """`url` naming database `dbname` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


class PostgresServer:
    """A PostgreSQL server for tests: URLs of its databases, and, when private, stop/start."""

    def __init__(
        self,
        admin_url: str,
        *,
        data_dir: Path | None = None,
        bin_dir: Path | None = None,
        port: int | None = None,
        run_as: str | None = None,
    ) -> None:
        self._admin_url = admin_url
        self._data_dir = data_dir
        self._bin_dir = bin_dir
        self._port = port
        self._run_as = run_as

    @classmethod
    def external(cls, url: str) -> PostgresServer:
        """A server someone else runs; it cannot be stopped from here."""
        return cls(url)

    @classmethod
    def private(cls, bin_dir: Path) -> PostgresServer:
        """initdb a fresh cluster in a temporary directory and start it on a free port."""
        run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(OS_USER)
            except KeyError as exc:
                raise PostgresUnavailable(
                    f"running as root and there is no {OS_USER!r} OS user to run initdb as"
                ) from exc
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is not installed")
            run_as = OS_USER
        # Not pytest's tmp_path: that sits under a root-only directory the postgres user
        # cannot enter.
        base = Path(tempfile.mkdtemp(prefix="nexus-pg-"))
        if run_as is not None:
            shutil.chown(base, user=run_as)
        port = free_port()
        server = cls(
            f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres",
            data_dir=base / "data",
            bin_dir=bin_dir,
            port=port,
            run_as=run_as,
        )
        try:
            server._run(
                "initdb",
                "-D",
                str(server.data_dir),
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    # -- what tests use ---------------------------------------------------------------

    @property
    def managed(self) -> bool:
        """True when this session started the server, so it can be stopped and started."""
        return self._data_dir is not None

    @property
    def data_dir(self) -> Path:
        """The cluster's directory (private servers only)."""
        if self._data_dir is None:
            raise RuntimeError("an external server has no data directory here")
        return self._data_dir

    def url(self, dbname: str = "postgres") -> str:
        """A postgresql:// URL of database `dbname` on this server."""
        return with_dbname(self._admin_url, dbname)

    def create_database(self) -> str:
        """Create an empty database with a fresh name and return that name."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.execute_admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop `name`, disconnecting whoever still uses it."""
        if not _DBNAME.fullmatch(name):
            raise ValueError(f"not a test database name: {name!r}")
        self.execute_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def execute_admin(self, sql: str) -> None:
        """Run one statement, outside a transaction, on the `postgres` database."""
        import psycopg  # here, not at the top: a gevent test must patch before psycopg is imported

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl -m smart|fast|immediate) and wait until it is down."""
        self._require_managed()
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(SERVER_TIMEOUT), "stop")

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        self._require_managed()
        settings = " ".join(f"-c {s}" for s in FAST_SETTINGS)
        options = f"-p {self._port} -k {self.data_dir.parent} -c listen_addresses=127.0.0.1 {settings}"
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir.parent / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(SERVER_TIMEOUT),
            "start",
        )
        self._wait_ready()

    def restart(self, mode: str = "fast") -> None:
        """Stop, then start again on the same port."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server if it runs and delete its directory. Idempotent."""
        if self._data_dir is None:
            return
        base = self._data_dir.parent
        if (self._data_dir / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)

    # -- internals --------------------------------------------------------------------

    def _require_managed(self) -> None:
        if not self.managed:
            raise RuntimeError(f"the server of {URL_ENV} is not ours to stop or start")

    def _run(self, program: str, *args: str) -> None:
        assert self._bin_dir is not None
        command: Sequence[str] = [str(self._bin_dir / program), *args]
        if self._run_as is not None:
            command = ["runuser", "-u", self._run_as, "--", *command]
        # cwd: the postgres user may not be able to enter ours (e.g. /root).
        result = subprocess.run(
            command, cwd=self.data_dir.parent, capture_output=True, text=True, timeout=SERVER_TIMEOUT + 30, check=False
        )
        if result.returncode != 0:
            log = self.data_dir.parent / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(f"{program} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _session_server() -> Iterator[PostgresServer]:
    url = os.environ.get(URL_ENV)
    if url:
        yield PostgresServer.external(url)
        return
    bin_dir = find_bin_dir()
    if bin_dir is None:
        skip_or_fail(f"no PostgreSQL: set {URL_ENV}, or install the server (initdb, pg_ctl)")
    try:
        server = PostgresServer.private(bin_dir)
    except PostgresUnavailable as exc:
        skip_or_fail(f"cannot start a private PostgreSQL: {exc}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skips, or fails under NEXUS_TEST_REQUIRE_SERVICES=1, if none)."""
    yield from _session_server()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The admin URL of the session's server: the `postgres` database, as a superuser."""
    return postgres_server.url()


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database of its own for one test, dropped afterwards."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        # A test that stopped the server leaves it to the outage fixture to restart it;
        # a database that cannot be dropped now is dropped with the private cluster.
        with contextlib.suppress(Exception):
            postgres_server.drop_database(name)


@pytest.fixture
def dead_postgres_url() -> str:
    """A postgresql:// URL of 127.0.0.1 where nothing listens: connections are refused."""
    return f"postgresql://nobody@127.0.0.1:{free_port()}/none"


@pytest.fixture
def managed_postgres(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """The session's server, for tests that stop it; always running again after the test."""
    if not postgres_server.managed:
        skip_or_fail(f"the server of {URL_ENV} cannot be stopped by the tests")
    try:
        yield postgres_server
    finally:
        if not (postgres_server.data_dir / "postmaster.pid").exists():
            postgres_server.start()
