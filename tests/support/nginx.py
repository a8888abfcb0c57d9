"""A real nginx for tests, run from the project's own deploy/nginx.conf.

The shipped file is rendered for the test, and only where it must be: the listen port,
one upstream `server` line per backend (keeping the shipped parameters), the pid file,
and the temp paths, which point into the test's directory so that nothing under /var
or /run is touched. Running as root, nginx's workers would switch to `nobody`, who
cannot enter pytest's root-only temp directories; the rendering then adds `user root;`.
A test may ask for two more changes, named at the call: a shorter `proxy_read_timeout`
(to see a 504 in a moment), and a `limit_conn` on `location /` (to make nginx answer a
503 of its own; the shipped file sets no limit).
Every substitution must match exactly once, so a change in the shipped file's shape
fails loudly here instead of silently testing another config.

- nginx not installed: the tests skip, unless ``NEXUS_TEST_REQUIRE_SERVICES=1``, where they fail.

Use the `nginx` fixture by loading this module as a plugin::

    pytest_plugins = ["tests.support.nginx"]
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from tests.support.services import HOST, free_port, kill_session, read_log, skip_or_fail, start_in_session

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONF = ROOT / "deploy" / "nginx.conf"
#: Where Debian puts the binary; PATH is searched first.
DEBIAN_NGINX = Path("/usr/sbin/nginx")
#: How long nginx may take to start or to stop gracefully: far above its usual few ms.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

_LISTEN = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+8080;[ \t]*$", re.MULTILINE)
_UPSTREAM_SERVER = re.compile(
    r"^(?P<indent>[ \t]*)server[ \t]+127\.0\.0\.1:8000(?P<params>[^;\n]*);[ \t]*$", re.MULTILINE
)
_PID = re.compile(r"^pid[ \t]+[^;\n]+;[ \t]*$", re.MULTILINE)
_HTTP_OPEN = re.compile(r"^http[ \t]*\{[ \t]*$", re.MULTILINE)
_USER = re.compile(r"^user[ \t]", re.MULTILINE)
_READ_TIMEOUT = re.compile(r"^(?P<indent>[ \t]*)proxy_read_timeout[ \t]+[^;\n]+;[ \t]*$", re.MULTILINE)
_ROOT_LOCATION = re.compile(r"^(?P<indent>[ \t]*)location[ \t]+/[ \t]*\{[ \t]*$", re.MULTILINE)
#: The shared-memory zone of the test-only `limit_conn`.
CONN_ZONE = "nexus_test_conn"


class NginxConfigShape(AssertionError):
    """deploy/nginx.conf no longer has the lines the test rendering substitutes."""


def find_nginx() -> Path | None:
    """The nginx binary: PATH first, then Debian's /usr/sbin (often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found is not None:
        return Path(found)
    return DEBIAN_NGINX if os.access(DEBIAN_NGINX, os.X_OK) else None


def _sub_once(pattern: re.Pattern[str], replace: str | Callable[[re.Match[str]], str], text: str, what: str) -> str:
    result, count = pattern.subn(replace, text)
    if count != 1:
        raise NginxConfigShape(f"{SHIPPED_CONF}: expected one {what}, found {count}")
    return result


def render_config(
    text: str,
    *,
    port: int,
    backends: Sequence[int],
    prefix: Path,
    as_root: bool,
    read_timeout: str | None = None,
    conn_limit: int | None = None,
) -> str:
    """The shipped config, listening on `port`, proxying to `backends`, with every path under `prefix`.

    `read_timeout` replaces the shipped `proxy_read_timeout`; `conn_limit` allows that many
    requests at a time through `location /` (nginx answers 503 beyond it).
    """
    if not backends:
        raise ValueError("at least one backend port is needed")
    text = _sub_once(_LISTEN, lambda m: f"{m['indent']}listen {HOST}:{port};", text, "`listen 8080;`")

    def servers(m: re.Match[str]) -> str:
        return "\n".join(f"{m['indent']}server {HOST}:{b}{m['params']};" for b in backends)

    text = _sub_once(_UPSTREAM_SERVER, servers, text, "upstream `server 127.0.0.1:8000 ...;`")
    text = _sub_once(_PID, f"pid {prefix / 'nginx.pid'};", text, "`pid ...;`")
    temp_lines = "".join(f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in TEMP_DIRS)
    if conn_limit is not None:
        temp_lines += f"    limit_conn_zone $binary_remote_addr zone={CONN_ZONE}:1m;\n"

        def limited(m: re.Match[str]) -> str:
            return f"{m[0]}\n{m['indent']}    limit_conn {CONN_ZONE} {conn_limit};"

        text = _sub_once(_ROOT_LOCATION, limited, text, "`location / {`")
    if read_timeout is not None:
        timeout = read_timeout
        text = _sub_once(
            _READ_TIMEOUT, lambda m: f"{m['indent']}proxy_read_timeout {timeout};", text, "`proxy_read_timeout ...;`"
        )
    text = _sub_once(_HTTP_OPEN, lambda m: f"{m[0]}\n{temp_lines.rstrip()}", text, "`http {`")
    if as_root:
        if _USER.search(text):
            raise NginxConfigShape(f"{SHIPPED_CONF}: has a `user` directive; the rendering would add a second")
        # Test rendering only: workers as root can enter pytest's root-only tmp dirs.
        text = "user root;\n" + text
    return text


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class Nginx:
    """One nginx master started by `start_nginx`, and its rendered config and log."""

    proc: subprocess.Popen[bytes]
    port: int
    prefix: Path
    conf_path: Path
    log_path: Path

    def log_text(self) -> str:
        return read_log(self.log_path)

    def wait_answering(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until nginx accepts connections on its port; AssertionError with its log if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode} while starting\n{self.log_text()}")
            if _accepts(self.port):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"nginx did not answer on {self.port} within {timeout} s\n{self.log_text()}")
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGTERM, then SIGKILL to the whole group; waits each time."""
        for sig in (signal.SIGQUIT, signal.SIGTERM):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        # Workers share the master's process group; none may outlive the test.
        kill_session(self.proc, STOP_TIMEOUT)


def start_nginx(
    binary: Path,
    prefix: Path,
    backends: Sequence[int],
    *,
    port: int | None = None,
    read_timeout: str | None = None,
    conn_limit: int | None = None,
) -> Nginx:
    """Render deploy/nginx.conf into `prefix`, run `nginx -c CONF -p PREFIX -g 'daemon off;'`, wait until it answers."""
    port = free_port() if port is None else port
    prefix.mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (prefix / "temp" / name).mkdir(parents=True, exist_ok=True)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(
        render_config(
            SHIPPED_CONF.read_text(),
            port=port,
            backends=backends,
            prefix=prefix,
            as_root=os.geteuid() == 0,
            read_timeout=read_timeout,
            conn_limit=conn_limit,
        )
    )
    log_path = prefix / "nginx.log"
    proc = start_in_session(
        # -e stderr: the error log nginx opens before it has read the config.
        [str(binary), "-c", str(conf_path), "-p", f"{prefix}/", "-e", "stderr", "-g", "daemon off;"],
        cwd=prefix,
        log_path=log_path,
    )
    server = Nginx(proc=proc, port=port, prefix=prefix, conf_path=conf_path, log_path=log_path)
    try:
        server.wait_answering()
    except BaseException:
        server.stop()
        raise
    return server


class LaunchNginx(Protocol):
    """The `nginx` fixture: start one nginx in front of `backends`, with the test-only changes named."""

    def __call__(
        self, backends: Sequence[int], *, read_timeout: str | None = None, conn_limit: int | None = None
    ) -> Nginx: ...


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[LaunchNginx]:
    """Starts nginx from deploy/nginx.conf in front of the given backend ports; stops every one at teardown."""
    binary = find_nginx()
    if binary is None:
        skip_or_fail("nginx is not installed (looked on PATH and in /usr/sbin)")
    started: list[Nginx] = []

    def launch(backends: Sequence[int], *, read_timeout: str | None = None, conn_limit: int | None = None) -> Nginx:
        server = start_nginx(
            binary, tmp_path / f"nginx-{len(started)}", backends, read_timeout=read_timeout, conn_limit=conn_limit
        )
        started.append(server)
        return server

    yield launch
    for server in started:
        server.stop()
