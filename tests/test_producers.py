"""Real producers against a real gunicorn, each run from the config docs/clients.md shows.

syslog-ng tails a file and posts NDJSON batches; collectd's write_http posts JSON arrays
of value lists; the Python clients (urllib3, requests, the standard library) and the Node
ones (built-in fetch, got) post batches. Every config and script comes from
deploy/clients/, and docs/clients.md includes each of those files verbatim (pinned below),
so what the doc shows is what ran here.

A program not installed skips, except in CI (``NEXUS_TEST_REQUIRE_SERVICES=1``), where
it fails. Waits poll the destination with a deadline.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.proc import HOST, SOURCE, TOKEN, Gunicorn, Launcher, ProcessTestError, ready, wait_for
from tests.support.producers import CLIENTS, Producer, program, start_collectd, start_syslog_ng, stored_payloads
from tests.support.services import skip_or_fail

pytestmark = [pytest.mark.process, pytest.mark.producers]

ROOT = Path(__file__).resolve().parents[1]
CLIENTS_DOC = ROOT / "docs" / "clients.md"
#: How long a producer may take to deliver everything: syslog-ng polls its file every
#: second and sends a partial batch 1 s after its first line; collectd flushes every 10 s.
DELIVERY_TIMEOUT = 60.0
#: Lines syslog-ng follows: several full batches of 10 and a partial one.
SYSLOG_LINES = 95
#: Value lists collectd's exec plugin emits: several 4 KiB buffers and a partial one.
COLLECTD_VALUES = 45
#: Entries each client posts in one batch.
CLIENT_BATCH = 25
#: What installs got for the Node test: the version docs/clients.md names.
GOT_PACKAGE = "got@14"


@pytest.fixture
def server(launch: Launcher) -> Gunicorn:
    """A ready gunicorn (two workers) on the embedded SQLite default."""
    return ready(launch(workers=2))


@pytest.fixture
def producers() -> Iterator[list[Producer]]:
    """The producers a test starts; each is killed (its whole session) at teardown."""
    started: list[Producer] = []
    yield started
    for producer in started:
        producer.cleanup()


def inbound_url(server: Gunicorn) -> str:
    return f"http://{HOST}:{server.port}/inbound/{SOURCE}"


def wait_rows(server: Gunicorn, count: int, describe: Callable[[], str]) -> list[dict[str, Any]]:
    """Poll the destination until it holds at least `count` rows; their payloads."""
    return wait_for(
        lambda: rows if len(rows := stored_payloads(server.db_path)) >= count else [],
        DELIVERY_TIMEOUT,
        f"{count} rows",
        describe=lambda: f"rows so far: {len(stored_payloads(server.db_path))}\n{describe()}\n{server.log_tail()}",
    )


def load_client(name: str) -> ModuleType:
    """deploy/clients/<name>.py as a module (it is a file to copy, not a package)."""
    spec = importlib.util.spec_from_file_location(f"nexus_client_{name}", CLIENTS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def marked_entries(client: str) -> list[dict[str, object]]:
    return [{"client": client, "n": n} for n in range(CLIENT_BATCH)]


def assert_stored_once(server: Gunicorn, client: str, answer: dict[str, Any]) -> None:
    """The batch's answer names CLIENT_BATCH ids, and each marker of `client` is stored in exactly one row."""
    assert answer["status"] == "accepted", answer
    assert len(answer["payload_ids"]) == CLIENT_BATCH
    rows = wait_rows(server, CLIENT_BATCH, lambda: f"answer: {answer}")
    markers = Counter(row["n"] for row in rows if row.get("client") == client)
    assert markers == Counter(range(CLIENT_BATCH))


class TestSyslogNg:
    """syslog-ng's http() destination, from deploy/clients/syslog-ng.conf."""

    def test_every_line_of_a_followed_file_is_stored_exactly_once(
        self, server: Gunicorn, producers: list[Producer], tmp_path: Path
    ) -> None:
        """syslog-ng following a file posts NDJSON batches of 10; every line written is one row, none twice."""
        # Given syslog-ng following an empty file, posting to the service
        tail_file = tmp_path / "app.log"
        tail_file.touch()
        syslog = start_syslog_ng(
            tmp_path / "syslog-ng", url=f"http://{HOST}:{server.port}", token=TOKEN, tail_file=tail_file
        )
        producers.append(syslog)

        # When lines carrying a marker each are appended to the file
        with tail_file.open("a") as out:
            for n in range(SYSLOG_LINES):
                out.write(f"line {n} of the syslog-ng test\n")

        # Then every line is stored, each exactly once, as the config's JSON object
        def describe() -> str:
            return f"syslog-ng alive: {syslog.alive()}\n{syslog.log_tail()}"

        rows = wait_rows(server, SYSLOG_LINES, describe)
        markers = Counter(int(m.group(1)) for row in rows if (m := re.fullmatch(r"line (\d+) of .*", row["message"])))
        assert markers == Counter(range(SYSLOG_LINES)), describe()
        assert len(rows) == SYSLOG_LINES
        assert {"message", "host", "file", "received"} <= rows[0].keys()
        assert rows[0]["file"] == str(tail_file)
        # ... in batches (at most 10 lines each, so at least SYSLOG_LINES / 10 requests),
        # not a request per line, and each request accepted
        posts = [e for e in server.events("request") if e.get("path") == f"/inbound/{SOURCE}"]
        assert -(-SYSLOG_LINES // 10) <= len(posts) < SYSLOG_LINES
        assert {e["status"] for e in posts} == {202}


class TestCollectd:
    """collectd's write_http plugin, from deploy/clients/collectd.conf."""

    def test_every_value_list_is_stored_exactly_once_as_a_row(
        self, server: Gunicorn, producers: list[Producer], tmp_path: Path
    ) -> None:
        """collectd posts JSON arrays of value lists; each value list is one row, none lost, none twice."""
        # Given collectd with the shipped write_http config, and an exec plugin emitting
        # COLLECTD_VALUES value lists of one gauge, valued 0 .. COLLECTD_VALUES-1
        collectd = start_collectd(
            tmp_path / "collectd", url=f"http://{HOST}:{server.port}", token=TOKEN, values=COLLECTD_VALUES
        )
        producers.append(collectd)

        # When collectd posts them
        def describe() -> str:
            return f"collectd alive: {collectd.alive()}\n{collectd.log_tail()}"

        rows = wait_rows(server, COLLECTD_VALUES, describe)

        # Then each value list is one row, in collectd's JSON form, each value exactly once
        assert len(rows) == COLLECTD_VALUES, describe()
        assert all(row["plugin"] == "seq" and row["type"] == "gauge" for row in rows)
        assert Counter(int(row["values"][0]) for row in rows) == Counter(range(COLLECTD_VALUES))
        assert len({row["time"] for row in rows}) == COLLECTD_VALUES


class TestPythonClients:
    """The Python clients of deploy/clients/: each posts one batch, stored once."""

    def test_urllib3_with_retries_posts_a_json_array(self, server: Gunicorn) -> None:
        """deploy/clients/python_urllib3.py: a JSON array with a Bearer token is 202 and every entry one row."""
        # Given the urllib3 client
        client = load_client("python_urllib3")
        # When it posts a batch
        answer = client.post_batch(inbound_url(server), TOKEN, marked_entries("urllib3"))
        # Then every entry is stored once
        assert_stored_once(server, "urllib3", answer)

    def test_requests_posts_ndjson_with_basic_auth(self, server: Gunicorn) -> None:
        """deploy/clients/python_requests.py: NDJSON with the token as the Basic password is 202, each entry once."""
        # Given the requests client
        pytest.importorskip("requests")
        client = load_client("python_requests")
        # When it posts a batch
        answer = client.post_batch(inbound_url(server), TOKEN, marked_entries("requests"))
        # Then every entry is stored once
        assert_stored_once(server, "requests", answer)

    def test_the_standard_library_posts_a_json_array(self, server: Gunicorn) -> None:
        """deploy/clients/python_stdlib.py: urllib.request's JSON array is 202, and every entry one row."""
        # Given the standard-library client
        client = load_client("python_stdlib")
        # When it posts a batch
        answer = client.post_batch(inbound_url(server), TOKEN, marked_entries("stdlib"))
        # Then every entry is stored once
        assert_stored_once(server, "stdlib", answer)


def run_node(script: str, cwd: Path, timeout: float = 60.0) -> Any:
    """Run the ES module `script` with node in `cwd`; the JSON it prints."""
    node = program("node")
    result = subprocess.run(
        [node, "--input-type=module", "-e", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ProcessTestError(f"node exited with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout)


def node_post_script(module: Path, server: Gunicorn, client: str) -> str:
    entries = json.dumps(marked_entries(client))
    return (
        f"import {{ postBatch }} from {json.dumps(module.as_uri())};\n"
        f"const answer = await postBatch({json.dumps(inbound_url(server))}, {json.dumps(TOKEN)}, {entries});\n"
        "console.log(JSON.stringify(answer));\n"
    )


@pytest.fixture(scope="module")
def got_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with got installed by npm from the registry, and deploy/clients/node_got.mjs copied beside it."""
    npm = program("npm")
    folder = tmp_path_factory.mktemp("got")
    try:
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-save", GOT_PACKAGE],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired:
        skip_or_fail(f"npm install {GOT_PACKAGE} took more than 180 s")
    if installed.returncode != 0:
        skip_or_fail(f"npm install {GOT_PACKAGE} failed: {installed.stderr[-500:]}")
    # An ES module resolves `got` from its own folder, so the client goes next to node_modules.
    (folder / "node_got.mjs").write_bytes((CLIENTS / "node_got.mjs").read_bytes())
    return folder


class TestNodeClients:
    """The Node clients of deploy/clients/: each posts one batch, stored once."""

    def test_built_in_fetch_posts_a_json_array(self, server: Gunicorn, tmp_path: Path) -> None:
        """deploy/clients/node_fetch.mjs: Node's fetch posts a JSON array, 202, and every entry is one row."""
        # Given the fetch client
        script = node_post_script(CLIENTS / "node_fetch.mjs", server, "fetch")
        # When node runs it
        answer = run_node(script, tmp_path)
        # Then every entry is stored once
        assert_stored_once(server, "fetch", answer)

    def test_got_posts_a_json_array(self, server: Gunicorn, got_dir: Path) -> None:
        """deploy/clients/node_got.mjs: got posts a JSON array, 202, and every entry is one row."""
        # Given the got client, with got installed beside it
        script = node_post_script(got_dir / "node_got.mjs", server, "got")
        # When node runs it
        answer = run_node(script, got_dir)
        # Then every entry is stored once
        assert_stored_once(server, "got", answer)


class TestClientsDoc:
    """docs/clients.md shows the tested files themselves."""

    @pytest.mark.parametrize("path", sorted(CLIENTS.iterdir()), ids=lambda p: p.name)
    def test_the_doc_includes_each_client_file_verbatim(self, path: Path) -> None:
        """Each file of deploy/clients/ is in docs/clients.md, whole and unchanged, in a fenced block."""
        # Given the doc and a client file
        doc = CLIENTS_DOC.read_text()
        # Then the file's text is the body of one of the doc's code blocks
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", doc, flags=re.MULTILINE | re.DOTALL)
        assert path.read_text() in blocks, f"{path.name} is not shown verbatim in {CLIENTS_DOC.name}"
