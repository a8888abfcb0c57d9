"""Start gunicorn apps and drive them with wrk; parse what wrk reports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


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
    full_env = {
        **os.environ,
        "NEXUS_DATA_DIR": str(data_dir),
        "NEXUS_BIND": f"127.0.0.1:{port}",
        "NEXUS_TOKEN": token,
        "NEXUS_ADMIN_TOKEN": "bench-admin-" + os.urandom(8).hex(),
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
    server = Server(port, proc, data_dir, token)
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

    def rate(self, status: int | None = None) -> float:
        n = self.requests if status is None else self.statuses.get(status, 0)
        return n / self.seconds


def wrk(
    url: str, *, token: str, connections: int = 64, seconds: int = 10, threads: int = 2, rate: int | None = None
) -> WrkResult:
    """Run wrk (or wrk2-style fixed rate where available) against `url` with bench/post.lua."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(ROOT / "bench" / "post.lua"),
        url,
    ]
    if rate is not None:
        cmd[1:1] = [f"-R{rate}"]
    out = subprocess.run(
        cmd,
        env={**os.environ, "NEXUS_BENCH_TOKEN": token},
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    statuses = {int(k): v for k, v in json.loads(re.search(r"STATUSES (\{.*\})", out).group(1)).items()}  # type: ignore[union-attr]
    lat = re.search(r"LATENCY_US p50=(\d+) p99=(\d+) max=(\d+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    assert lat is not None, out
    assert total is not None, out
    secs = float(total.group(2)) * (0.001 if total.group(3) == "ms" else 1.0)
    return WrkResult(
        secs,
        int(total.group(1)),
        statuses,
        int(lat.group(1)) / 1000,
        int(lat.group(2)) / 1000,
        int(lat.group(3)) / 1000,
    )


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
