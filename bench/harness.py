"""Start gunicorn apps and drive them with wrk; parse what wrk reports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    token: str
    admin_token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: the master's children."""
        return children(self.process.pid)

    def metrics(self) -> dict[str, float]:
        """GET /metrics (admin token), as {'name{labels}': value}; sums over the workers."""
        return get_metrics(self.url, self.admin_token)


def _wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback only
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


@contextmanager
def gunicorn(
    app: str, data_dir: Path, *, workers: int = 2, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[Server]:
    """Run `app` under gunicorn.conf.py's settings on a free loopback port."""
    port = free_port()
    token = "bench-token-" + os.urandom(8).hex()
    admin_token = "bench-admin-" + os.urandom(8).hex()
    full_env = {
        **os.environ,
        "NEXUS_DATA_DIR": str(data_dir),
        "NEXUS_BIND": f"127.0.0.1:{port}",
        "NEXUS_TOKEN": token,
        "NEXUS_ADMIN_TOKEN": admin_token,
        "WEB_CONCURRENCY": str(workers),
        "NEXUS_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    out = open(log or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(GUNICORN), "-c", "gunicorn.conf.py", app],
        cwd=ROOT,
        env=full_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(port, proc, data_dir, token, admin_token)
    try:
        probe = "/ready" if app == "wsgi:app" else "/inbound/x"
        _wait_http(server.url + probe, time.monotonic() + 60)
        if app == "wsgi:app":
            # Every worker must be ready, not just the first to answer.
            for _ in range(workers * 4):
                _wait_http(server.url + "/ready", time.monotonic() + 60)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()


@dataclass
class WrkResult:
    seconds: float
    requests: int
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: wrk's socket errors (connect, read, write, timeout), when it reports any.
    errors: dict[str, int] = field(default_factory=dict)

    def rate(self, status: int | None = None) -> float:
        n = self.requests if status is None else self.statuses.get(status, 0)
        return n / self.seconds


def wrk(
    url: str,
    *,
    token: str,
    connections: int = 64,
    seconds: float = 10,
    threads: int = 2,
    rate: float | None = None,
) -> WrkResult:
    """Run wrk against `url` with bench/post.lua: saturating (closed loop, no think time).

    With `rate` (requests/s, in all), bench/post_rate.lua paces the load instead: each
    connection waits connections/rate seconds on average between a response and its
    next request (wrk's delay() hook; plain wrk has no -R). The rate reached is a little
    lower than asked, by the time each request itself takes: read it from the result.
    """
    script = "post.lua" if rate is None else "post_rate.lua"
    env = {**os.environ, "NEXUS_BENCH_TOKEN": token}
    if rate is not None:
        env["NEXUS_BENCH_RATE"] = repr(float(rate))
        env["NEXUS_BENCH_CONNECTIONS"] = str(connections)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(ROOT / "bench" / script),
        url,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def parse_wrk(out: str) -> WrkResult:
    """What post.lua's done() and wrk's own summary say."""
    found = re.search(r"STATUSES (\{.*\})", out)
    lat = re.search(r"LATENCY_US p50=(\d+) p99=(\d+) max=(\d+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert found is not None, out
    assert lat is not None, out
    assert total is not None, out
    statuses = {int(k): int(v) for k, v in json.loads(found.group(1)).items()}
    errors_line = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = {}
    if errors_line is not None:
        errors = {
            name: int(value)
            for name, value in zip(("connect", "read", "write", "timeout"), errors_line.groups(), strict=True)
            if int(value)
        }
    secs = float(total.group(2)) * (0.001 if total.group(3) == "ms" else 1.0)
    return WrkResult(
        secs,
        int(total.group(1)),
        statuses,
        int(lat.group(1)) / 1000,
        int(lat.group(2)) / 1000,
        int(lat.group(3)) / 1000,
        errors,
    )


# -- what the bench reads of a running service -------------------------------------------


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in task.read_text().split())
    return sorted(set(found))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time, all threads, of `pids` so far (Linux /proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid`, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$")


def get_metrics(url: str, admin_token: str) -> dict[str, float]:
    """The Prometheus text of GET /metrics, as {'name{labels}': value}."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    request = urllib.request.Request(url + "/metrics", headers=headers)  # noqa: S310 - loopback only
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback only
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match is not None:
            values[match.group(1)] = float(match.group(2))
    return values


def sqlite_rows(db: Path) -> int:
    """Rows delivered to a SQLite destination so far (0 before its table exists)."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            return int(conn.execute("SELECT count(*) FROM nexus_entries").fetchone()[0])
    except sqlite3.Error:
        return 0


@contextmanager
def sqlite_locked(db: Path) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite destination: its writes fail with "database is locked"."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextmanager
def nginx(backend_ports: list[int], workdir: Path) -> Iterator[int]:
    """deploy/nginx.conf, rendered for loopback ports and a private prefix; yields its port."""
    port = free_port()
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in backend_ports)
    text = re.sub(r"        server 127\.0\.0\.1:8000[^\n]*\n", servers, text)
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("pid /run/nexus-nginx.pid;", f"pid {workdir}/nginx.pid;")
    temp = "".join(
        f"    {name}_temp_path {workdir}/{name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    if os.geteuid() == 0:
        text = "user root;\n" + text
    conf = workdir / "nginx.conf"
    conf.write_text(text)
    proc = subprocess.Popen(
        ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", time.monotonic() + 30)
        yield port
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
