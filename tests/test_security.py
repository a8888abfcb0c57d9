"""Security: who may call what, tokens compared in constant time, no secret in a log, private files.

In-process, on a real `Service` (WAL and SQLite under tmp_path) behind
`falcon.testing.TestClient`. Two sources write to two destinations, so "another
source's token" is a token that is valid, but for the wrong source and destination.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import base64
import hmac
import io
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import falcon.testing
import orjson
import pytest

from nexus_gevent import lifecycle
from nexus_gevent.auth import Authenticator, Principal, presented_token, tokens_equal
from nexus_gevent.config import ADMIN_TOKEN_FILENAME, Settings, load_settings
from nexus_gevent.datadir import SECRETS_DIRNAME
from nexus_gevent.http.app import create_app
from nexus_gevent.logs import get_logger
from nexus_gevent.testing import RecordingLogger, make_entry, wait_until
from tests.support.config_toml import config_toml, destination_table, source_table
from tests.support.proc import Launcher, count_rows, exchange, post_headers, ready, wait_for

SOURCE_TOKEN = "security-source-token-7c1e"
OTHER_TOKEN = "security-other-token-2b9f"
ADMIN_TOKEN = "security-admin-token-d40a"
GARBAGE_TOKEN = "security-garbage-token-9e55"

#: The token classes of the matrix: what the Authorization header carries.
TOKEN_CLASSES: dict[str, str | None] = {
    "none": None,
    "garbage": GARBAGE_TOKEN,
    "source": SOURCE_TOKEN,
    "other_source": OTHER_TOKEN,
    "admin": ADMIN_TOKEN,
}

#: `default` writes to destination `default`; `other` writes to `elsewhere`.
CONFIG = config_toml(
    destination_table("elsewhere", "sqlite:///{data_dir}/elsewhere.db"),
    source_table("default", token=SOURCE_TOKEN, destination="default"),
    source_table("other", token=OTHER_TOKEN, destination="elsewhere"),
)

#: The dead letter the retry endpoint is called with (recorded before the matrix runs).
DEAD_LETTER_ID = "d" * 32
#: The one the Basic-auth pass of the matrix retries: a retry consumes its dead letter.
BASIC_DEAD_LETTER_ID = "b" * 32


@dataclass(frozen=True)
class Endpoint:
    """One route of the API and the status each token class must get from it."""

    method: str
    path: str
    expected: dict[str, int]
    #: The error code of a 403 here.
    forbidden_code: str = "admin_only"


ADMIN_ONLY = {"none": 401, "garbage": 401, "source": 403, "other_source": 403, "admin": 200}
OPEN = dict.fromkeys(TOKEN_CLASSES, 200)

ENDPOINTS: dict[str, Endpoint] = {
    "inbound": Endpoint(
        "POST",
        "/inbound/default",
        {"none": 401, "garbage": 401, "source": 202, "other_source": 403, "admin": 403},
        forbidden_code="source_mismatch",
    ),
    "query": Endpoint(
        "GET",
        "/query/default",
        {"none": 401, "garbage": 401, "source": 200, "other_source": 403, "admin": 200},
        forbidden_code="source_mismatch",
    ),
    "metrics": Endpoint("GET", "/metrics", ADMIN_ONLY),
    "admin_status": Endpoint("GET", "/admin/status", ADMIN_ONLY),
    "admin_dead_letters": Endpoint("GET", "/admin/dead-letters", ADMIN_ONLY),
    "admin_retry": Endpoint("POST", f"/admin/dead-letters/{DEAD_LETTER_ID}/retry", {**ADMIN_ONLY, "admin": 202}),
    "health": Endpoint("GET", "/health", OPEN),
    "ready": Endpoint("GET", "/ready", OPEN),
}

CELLS = [(name, token_class) for name in ENDPOINTS for token_class in TOKEN_CLASSES]


def headers_for(token_class: str, *, scheme: str = "Bearer") -> dict[str, str]:
    """The Authorization header of a token class: Bearer, or Basic with the token as the password."""
    token = TOKEN_CLASSES[token_class]
    if token is None:
        return {}
    if scheme == "Basic":
        return {"Authorization": "Basic " + base64.b64encode(f"any-user:{token}".encode()).decode("ascii")}
    return {"Authorization": f"Bearer {token}"}


class Node:
    """A started service with two sources, and a TestClient on its app."""

    def __init__(self, data_dir: Path, logger: Any) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "nexus.toml"
        config.write_text(CONFIG.replace("{data_dir}", str(data_dir)))
        env = {"NEXUS_DATA_DIR": str(data_dir), "NEXUS_CONFIG": str(config), "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN}
        self.service = lifecycle.assemble(load_settings(env), logger)
        self.service.start()
        assert self.service.wait_ready(5)
        assert self.service.dead_letters is not None
        for payload_id in (DEAD_LETTER_ID, BASIC_DEAD_LETTER_ID):
            dead = make_entry(payload_id, source="default", destination="default")
            self.service.dead_letters.record(dead, "rejected by the test", 5)
        self.client = falcon.testing.TestClient(create_app(self.service, logger))

    def call(
        self, endpoint: Endpoint, token_class: str, marker: str = "", *, scheme: str = "Bearer"
    ) -> falcon.testing.Result:
        body = orjson.dumps({"note": marker or "matrix"}) if endpoint.method == "POST" else None
        headers = headers_for(token_class, scheme=scheme)
        return self.client.simulate_request(endpoint.method, endpoint.path, headers=headers, body=body)

    def close(self) -> None:
        self.service.shutdown(5)


@pytest.fixture(scope="class")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One service for the whole matrix: no cell changes what another cell sees."""
    started = Node(tmp_path_factory.mktemp("security") / "data", RecordingLogger())
    yield started
    started.close()


def assert_contract_error(result: falcon.testing.Result, status: int, code: str) -> None:
    """The contract's error shape with the expected code; a 401 names the Bearer and Basic schemes."""
    assert result.status_code == status, result.text
    body = result.json
    assert set(body) >= {"error", "message", "details"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], dict)
    if status == 401:
        assert result.headers["WWW-Authenticate"] == 'Bearer realm="nexus", Basic realm="nexus"'


class TestAccessMatrix:
    """Every endpoint against every token class: none, garbage, source, another source's, admin."""

    @pytest.mark.parametrize(("endpoint_name", "token_class"), CELLS, ids=[f"{e}-{t}" for e, t in CELLS])
    def test_each_endpoint_answers_each_token_class_with_its_expected_status(
        self, node: Node, endpoint_name: str, token_class: str
    ) -> None:
        """401 without a known token, 403 for a valid token of the wrong kind, success for the right one."""
        endpoint = ENDPOINTS[endpoint_name]
        expected = endpoint.expected[token_class]

        result = node.call(endpoint, token_class)

        if expected == 401:
            assert_contract_error(result, 401, "unauthorized")
        elif expected == 403:
            assert_contract_error(result, 403, endpoint.forbidden_code)
        else:
            assert result.status_code == expected, result.text

    @pytest.mark.parametrize(("endpoint_name", "token_class"), CELLS, ids=[f"{e}-{t}" for e, t in CELLS])
    def test_basic_with_the_token_as_password_answers_as_bearer_does(
        self, node: Node, endpoint_name: str, token_class: str
    ) -> None:
        """Every cell again with the token as Basic's password (any user name): the same status as with Bearer."""
        endpoint = ENDPOINTS[endpoint_name]
        expected = endpoint.expected[token_class]
        if endpoint_name == "admin_retry":
            endpoint = replace(endpoint, path=endpoint.path.replace(DEAD_LETTER_ID, BASIC_DEAD_LETTER_ID))

        result = node.call(endpoint, token_class, scheme="Basic")

        if expected == 401:
            assert_contract_error(result, 401, "unauthorized")
        elif expected == 403:
            assert_contract_error(result, 403, endpoint.forbidden_code)
        else:
            assert result.status_code == expected, result.text

    def test_an_unknown_source_is_401_before_404_for_an_unknown_token(self, node: Node) -> None:
        """Source names do not leak: without a valid token an unknown source is 401, with one it is 404."""
        anonymous = node.client.simulate_post("/inbound/nosuch", body=b"{}", headers=headers_for("garbage"))
        known = node.client.simulate_post("/inbound/nosuch", body=b"{}", headers=headers_for("source"))

        assert_contract_error(anonymous, 401, "unauthorized")
        assert_contract_error(known, 404, "unknown_source")

    def test_another_sources_destination_is_not_readable(self, node: Node) -> None:
        """A source's token reads its own destination only: /query/elsewhere is 403 for `default`, 200 for `other`."""
        own = node.client.simulate_get("/query/elsewhere", headers=headers_for("other_source"))
        foreign = node.client.simulate_get("/query/elsewhere", headers=headers_for("source"))

        assert own.status_code == 200, own.text
        assert_contract_error(foreign, 403, "source_mismatch")


class TestNoSecretsInLogs:
    """The security matrix's own log lines hold no token and no body."""

    def test_the_matrix_logs_no_token_and_no_body(self, tmp_path: Path, captured_logs: io.StringIO) -> None:
        """Every cell of the matrix is logged as a request line; no token of any class, no body text appears."""
        # Given a service logging JSON lines into a buffer
        node = Node(tmp_path / "data", get_logger("nexus_gevent"))
        marker = f"body-marker-{uuid.uuid4().hex}"
        try:
            # When every cell of the matrix is called, each body carrying the marker
            for name, token_class in CELLS:
                node.call(ENDPOINTS[name], token_class, marker)
        finally:
            node.close()
        # Then each request was logged, and no token or body text was
        output = captured_logs.getvalue()
        lines = [orjson.loads(line) for line in output.splitlines()]
        assert len([line for line in lines if line.get("event") == "request"]) == len(CELLS)
        for token in (SOURCE_TOKEN, OTHER_TOKEN, ADMIN_TOKEN, GARBAGE_TOKEN):
            assert token not in output
        assert marker not in output


class RecordingCompare:
    """Stands in for hmac.compare_digest: records each call, then answers as the real one does."""

    def __init__(self, real: Callable[[bytes, bytes], bool]) -> None:
        self._real = real
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return self._real(a, b)


def many_sources_settings(tmp_path: Path, count: int) -> Settings:
    config = tmp_path / "many.toml"
    config.write_text(config_toml(*(source_table(f"s{i}", token=f"token-of-source-{i}") for i in range(count))))
    env = {"NEXUS_DATA_DIR": str(tmp_path / "data"), "NEXUS_CONFIG": str(config), "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN}
    return load_settings(env)


class TestConstantTimeTokens:
    """Tokens are compared with hmac.compare_digest, and against every configured token."""

    SOURCES = 5

    @pytest.fixture
    def compare(self, monkeypatch: pytest.MonkeyPatch) -> RecordingCompare:
        recorder = RecordingCompare(hmac.compare_digest)
        monkeypatch.setattr(hmac, "compare_digest", recorder)
        return recorder

    def test_tokens_equal_uses_hmac_compare_digest(self, compare: RecordingCompare) -> None:
        """tokens_equal is hmac.compare_digest over the tokens' bytes."""
        assert tokens_equal("same-token", "same-token")
        assert not tokens_equal("same-token", "other-token")

        assert compare.calls == [(b"same-token", b"same-token"), (b"same-token", b"other-token")]

    @pytest.mark.parametrize(
        ("presented", "principal"),
        [
            (ADMIN_TOKEN, Principal("admin")),
            ("token-of-source-0", Principal("source", "s0")),
            (f"token-of-source-{SOURCES - 1}", Principal("source", f"s{SOURCES - 1}")),
            ("no-such-token", None),
        ],
        ids=["admin", "first-source", "last-source", "unknown"],
    )
    def test_identify_compares_against_every_token_even_after_a_match(
        self, tmp_path: Path, compare: RecordingCompare, presented: str, principal: Principal | None
    ) -> None:
        """Whichever token matches, and where, identify makes one comparison per source token plus the admin's."""
        auth = Authenticator(many_sources_settings(tmp_path, self.SOURCES))

        found = auth.identify(f"Bearer {presented}")

        assert found == principal
        assert len(compare.calls) == self.SOURCES + 1
        assert {a for a, _ in compare.calls} == {presented.encode()}

    def test_identify_compares_a_basic_password_against_every_token(
        self, tmp_path: Path, compare: RecordingCompare
    ) -> None:
        """Basic's password is the token: identify finds its source, comparing it with every token as for Bearer."""
        auth = Authenticator(many_sources_settings(tmp_path, self.SOURCES))
        credential = base64.b64encode(b"any-user:token-of-source-0").decode("ascii")

        found = auth.identify(f"Basic {credential}")

        assert found == Principal("source", "s0")
        assert len(compare.calls) == self.SOURCES + 1
        assert {a for a, _ in compare.calls} == {b"token-of-source-0"}


class TestPresentedToken:
    """What an Authorization header carries: Bearer's credential, Basic's password (RFC 7617), or nothing."""

    @pytest.mark.parametrize(
        ("authorization", "token"),
        [
            ("Bearer abc", "abc"),
            ("bearer   abc ", "abc"),
            ("Basic " + base64.b64encode(b"user:abc").decode(), "abc"),
            ("BASIC " + base64.b64encode(b":abc").decode(), "abc"),
            ("Basic " + base64.b64encode(b"user:a:b:c").decode(), "a:b:c"),
            ("Basic " + base64.b64encode("ünï:päss".encode()).decode(), "päss"),
        ],
        ids=["bearer", "bearer-case-and-spaces", "basic", "basic-empty-user", "basic-colons-in-password", "utf8"],
    )
    def test_the_token_is_bearers_credential_or_basics_password(self, authorization: str, token: str) -> None:
        """Bearer's credential, or the part of Basic's "user:password" after the first colon, is the token."""
        assert presented_token(authorization) == token

    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "",
            "Bearer",
            "Basic",
            "Basic " + base64.b64encode(b"no-colon").decode(),
            "Basic " + base64.b64encode(b"user:").decode(),
            "Basic %%%not-base64",
            "Basic " + base64.b64encode(b"user:\xff").decode(),
            "Digest abc",
        ],
        ids=[
            "absent",
            "empty",
            "bearer-alone",
            "basic-alone",
            "no-colon",
            "empty-password",
            "bad-base64",
            "not-utf8",
            "other-scheme",
        ],
    )
    def test_a_malformed_or_other_credential_carries_no_token(self, authorization: str | None) -> None:
        """Basic without a colon, with an empty password, not base64 or not UTF-8, and other schemes carry no token."""
        assert presented_token(authorization) is None


@pytest.fixture
def default_umask() -> Iterator[None]:
    """The usual umask 022, under which files are created world-readable unless the service says otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def loose_modes(root: Path) -> list[str]:
    """Every path under `root` (and root itself) whose mode gives the group or others any permission."""
    found: list[str] = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


@pytest.mark.usefixtures("default_umask")
class TestFileModes:
    """What the service creates is its user's alone, whatever the umask."""

    def test_generated_secrets_are_0600_in_a_0700_directory(self, tmp_path: Path) -> None:
        """Without NEXUS_TOKEN and NEXUS_ADMIN_TOKEN the generated token files are 0600, their directory 0700."""
        data_dir = tmp_path / "data"

        settings = load_settings({"NEXUS_DATA_DIR": str(data_dir)})

        secrets_dir = data_dir / SECRETS_DIRNAME
        assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
        assert sorted(p.name for p in secrets_dir.iterdir()) == [ADMIN_TOKEN_FILENAME, "token-default"]
        for path in secrets_dir.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert sorted(settings.generated_secrets) == sorted(secrets_dir.iterdir())

    @pytest.mark.process
    def test_gunicorn_on_a_missing_data_dir_creates_everything_private(self, launch: Launcher, tmp_path: Path) -> None:
        """Under real gunicorn and umask 022, a data dir that did not exist is 0700 and nothing in it is open."""
        # Given a data directory that does not exist yet
        data_dir = tmp_path / "fresh" / "data"
        assert not data_dir.exists()
        # When gunicorn starts on it and an entry is written and delivered
        server = ready(launch(data_dir=data_dir))
        response = exchange(server.port, "POST", "/inbound/default", b'{"n": 1}', post_headers())
        assert response.status == 202, response.body
        wait_for(lambda: sum(count_rows(server.db_path).values()) == 1, 10, "the write delivered")
        # Then the data directory and everything in it (metrics files included) are private
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        assert (data_dir / "metrics").is_dir()
        assert loose_modes(data_dir) == []

    def test_the_data_dir_wal_and_sqlite_files_are_private_after_a_start(self, tmp_path: Path) -> None:
        """After a start and a delivered write: data dir, WAL and every SQLite file have no group or other bits."""
        # Given a service started on a fresh data dir under umask 022
        data_dir = tmp_path / "data"
        env = {"NEXUS_DATA_DIR": str(data_dir), "NEXUS_TOKEN": SOURCE_TOKEN, "NEXUS_ADMIN_TOKEN": ADMIN_TOKEN}
        service = lifecycle.assemble(load_settings(env), RecordingLogger())
        service.start()
        try:
            assert service.wait_ready(5)
            client = falcon.testing.TestClient(create_app(service, RecordingLogger()))
            # When an entry is written with an idempotency key and delivered
            result = client.simulate_post(
                "/inbound/default", body=b'{"n": 1}', headers={**headers_for("source"), "Idempotency-Key": "k-1"}
            )
            assert result.status_code == 202, result.text
            destination = service.destinations["default"]
            wait_until(lambda: destination.count() == 1, what="the write delivered")  # type: ignore[attr-defined]
            # Then everything it created is there, and none of it is open to the group or others
            names = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*")}
            expected = {"wal", "wal/w0", "wal/w0/LOCK", "nexus.db", "nexus.db-wal", "idempotency.db", "dead-letters.db"}
            assert expected <= names, sorted(names)
            assert any(name.startswith("wal/w0/seg-") for name in names), sorted(names)
            assert loose_modes(data_dir) == []
        finally:
            service.shutdown(5)
