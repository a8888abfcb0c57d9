"""Real producers for the tests: syslog-ng and collectd run from the configs under deploy/clients/.

Each runs in a session of its own (one `killpg` ends it and what it forked), with its
config, pid file, persist file and control socket under the test's directory, never
the system's. The shipped configs are used as they are: syslog-ng's reads the URL, the
token and the file to follow from its environment; collectd's gets the URL and the
token written in place of its placeholders, each of which must occur exactly once, so
that a change in the shipped file's shape fails here instead of testing another config.

- A program not installed: the tests skip, unless ``NEXUS_TEST_REQUIRE_SERVICES=1``, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.services import kill_session, read_log, skip_or_fail, start_in_session

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "deploy" / "clients"
SYSLOG_NG_CONF = CLIENTS / "syslog-ng.conf"
COLLECTD_CONF = CLIENTS / "collectd.conf"
#: Where Debian installs syslog-ng's modules, one folder per version (http() is libhttp.so).
SYSLOG_NG_MODULES = Path("/usr/lib/syslog-ng")
#: collectd.conf's placeholders, replaced by the test's URL and token.
#: (the config's lines, quote included: its comment names them too).
COLLECTD_URL = 'URL "http://127.0.0.1:8000'
COLLECTD_TOKEN = 'Bearer YOUR_TOKEN"'
#: Where Debian installs what collectd loads.
COLLECTD_PLUGIN_DIR = Path("/usr/lib/collectd")
COLLECTD_TYPES_DB = Path("/usr/share/collectd/types.db")
#: The host name collectd reports (and the exec plugin's PUTVAL lines name).
COLLECTD_HOST = "nexus-test"


def program(name: str) -> str:
    """The path of `name` on PATH or in /usr/sbin (where Debian puts daemons); skip or fail when missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        skip_or_fail(f"{name} is not installed")
    return found


@dataclass
class Producer:
    """One running producer: its process and its log."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(read_log(self.log_path).splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cleanup(self) -> None:
        kill_session(self.proc, 10)


def start_syslog_ng(workdir: Path, *, url: str, token: str, tail_file: Path) -> Producer:
    """syslog-ng in the foreground on deploy/clients/syslog-ng.conf, following `tail_file`, posting to `url`."""
    binary = program("syslog-ng")
    if not list(SYSLOG_NG_MODULES.glob("*/libhttp.so")):
        skip_or_fail("syslog-ng's http() destination (syslog-ng-mod-http) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NEXUS_URL": url,
        "NEXUS_TOKEN": token,
        "NEXUS_TAIL_FILE": str(tail_file),
    }
    command = [
        binary,
        "--foreground",
        "--stderr",
        "--no-caps",
        f"--cfgfile={SYSLOG_NG_CONF}",
        f"--persist-file={workdir / 'syslog-ng.persist'}",
        f"--pidfile={workdir / 'syslog-ng.pid'}",
        f"--control={workdir / 'syslog-ng.ctl'}",
    ]
    log_path = workdir / "syslog-ng.log"
    return Producer(start_in_session(command, cwd=workdir, log_path=log_path, env=env), log_path)


def exec_user() -> str:
    """Whom collectd's exec plugin runs its program as: it refuses root, so `nobody` when we are root."""
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


def collectd_config(workdir: Path, *, url: str, token: str, values: int) -> Path:
    """A collectd.conf under `workdir`: the shipped write_http config, and an exec plugin emitting `values` value lists.

    The exec plugin's program prints `values` PUTVAL lines, the gauge `seq/gauge-n` with
    the values 0 .. values-1 at the times now+0 .. now+values-1 (distinct, so collectd
    keeps each), then waits. Nothing else is loaded, so every value list collectd posts
    is one of those.
    """
    shipped = COLLECTD_CONF.read_text()
    for placeholder in (COLLECTD_URL, COLLECTD_TOKEN):
        if shipped.count(placeholder) != 1:
            raise AssertionError(f"{COLLECTD_CONF} must hold {placeholder!r} exactly once")
    node = workdir / "write_http.conf"
    node.write_text(shipped.replace(COLLECTD_URL, f'URL "{url}').replace(COLLECTD_TOKEN, f'Bearer {token}"'))
    script = (
        f"t=$(date +%s); i=0; while [ $i -lt {values} ]; do "
        f'echo "PUTVAL {COLLECTD_HOST}/seq/gauge-n interval=1 $((t+i)):$i"; i=$((i+1)); done; '
        "exec sleep 3600"
    )
    main = workdir / "collectd.conf"
    main.write_text(
        f'Hostname "{COLLECTD_HOST}"\n'
        "FQDNLookup false\n"
        f'BaseDir "{workdir}"\n'
        f'PIDFile "{workdir / "collectd.pid"}"\n'
        f'PluginDir "{COLLECTD_PLUGIN_DIR}"\n'
        f'TypesDB "{COLLECTD_TYPES_DB}"\n'
        "Interval 1\n"
        "LoadPlugin logfile\n"
        "<Plugin logfile>\n  LogLevel info\n  File STDOUT\n</Plugin>\n"
        "LoadPlugin exec\n"
        f'<Plugin exec>\n  Exec "{exec_user()}" "/bin/sh" "-c" "{_collectd_escape(script)}"\n</Plugin>\n'
        f'Include "{node}"\n'
    )
    return main


def _collectd_escape(text: str) -> str:
    """`text` inside a collectd config string: backslashes and double quotes escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def start_collectd(workdir: Path, *, url: str, token: str, values: int) -> Producer:
    """collectd in the foreground, posting `values` value lists to `url` with the shipped write_http config."""
    binary = program("collectd")
    if not (COLLECTD_PLUGIN_DIR / "write_http.so").exists():
        skip_or_fail("collectd's write_http plugin is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    config = collectd_config(workdir, url=url, token=token, values=values)
    checked = subprocess.run([binary, "-t", "-C", str(config)], capture_output=True, text=True, timeout=30, check=False)
    if checked.returncode != 0:
        raise AssertionError(f"collectd -t refused {config}: {checked.stdout}{checked.stderr}")
    log_path = workdir / "collectd.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    command = [binary, "-f", "-C", str(config), "-P", str(workdir / "collectd.pid")]
    return Producer(start_in_session(command, cwd=workdir, log_path=log_path, env=env), log_path)


def stored_payloads(db_path: Path) -> list[dict[str, Any]]:
    """Every row's payload in the SQLite destination, decoded; empty before the table exists."""
    if not db_path.exists():
        return []
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn:
        try:
            rows = conn.execute("SELECT payload FROM nexus_entries").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    return [json.loads(payload) for (payload,) in rows]
