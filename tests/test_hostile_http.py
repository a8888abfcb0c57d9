"""Hostile HTTP against a live gunicorn: bad bodies, lying framing, slow and many clients, path tricks, fuzzing.

One gunicorn with one worker serves the module, so every abusive request meets the
same process: the last test checks that this worker is the one that started, still
answering /health and accepting writes, and that nothing was answered with a 500.

Requests the app sees get the contract's error shape. A few are refused by
gunicorn's own HTTP parser before the app runs (a NUL in the request line, a request
line past 4094 bytes, a control character in a header, conflicting Content-Length):
gunicorn answers those 4xx in plain HTML, which is all it can do; they are checked
for the status alone.

The OpenAPI fuzz uses schemathesis (pinned in requirements-dev.txt): cases generated
from docs/openapi.yaml, positive and negative, each response checked against it.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.proc import (
    ADMIN_TOKEN,
    HOST,
    ROOT,
    TOKEN,
    Gunicorn,
    Launcher,
    Response,
    admin_headers,
    exchange,
    post_headers,
    wait_for,
)
from tests.support.services import skip_or_fail

pytestmark = pytest.mark.process

#: NEXUS_MAX_BODY_BYTES's default: the service runs with it.
MAX_BODY_BYTES = 1_048_576
#: How long a client waits for an answer that should come at once.
PROMPT = 2.0
#: The slow client sends one header byte per this many seconds ...
SLOW_BYTE_INTERVAL = 0.1
#: ... for this many bytes (3 s), while others must be served.
SLOW_BYTES = 30
#: A normal request made while a client misbehaves must finish within this.
NORMAL_LATENCY_LIMIT = 1.0
#: Sockets held open at once by the many-connections test.
CONNECTIONS = 1000
#: Examples per fuzzed operation and generation mode.
FUZZ_EXAMPLES = 100
#: File descriptors the test process (and the gunicorn it starts) may need.
WANTED_FDS = 4096

ERROR_KEYS = {"error", "message", "details"}


# -- the server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fd_limit() -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE so the test and its gunicorn can hold a thousand sockets each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_FDS if hard == resource.RLIM_INFINITY else min(WANTED_FDS, hard)
    if wanted < CONNECTIONS + 200:
        skip_or_fail(f"RLIMIT_NOFILE hard limit {hard} is too low for {CONNECTIONS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory, fd_limit: None) -> Iterator[Launcher]:
    launch = Launcher(tmp_path_factory.mktemp("hostile"))
    yield launch
    launch.cleanup()


@dataclass
class Target:
    """The module's gunicorn and the one worker it started with."""

    server: Gunicorn
    worker: int

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def target(launcher: Launcher) -> Target:
    """One gunicorn, one worker, for every test of the module."""
    server = launcher(workers=1)
    server.wait_ready()
    (worker,) = server.worker_pids()
    return Target(server, worker)


# -- raw HTTP ------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    """What came back on a raw socket: the first response, and whether the read timed out."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    raw: bytes
    seconds: float
    timed_out: bool

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str,
    target: str,
    body: bytes = b"",
    *,
    headers: dict[str, str] | None = None,
    content_length: int | str | None = None,
    close: bool = True,
) -> bytes:
    """An HTTP/1.1 request, byte for byte as given (no quoting, no checks)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_response(raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    body = rest[: int(length)] if length is not None and length.isdigit() else rest
    return status, headers, body


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (or `timeout` passes: then True)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), True
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), True
        except ConnectionResetError:
            return b"".join(chunks), False
        if not data:
            return b"".join(chunks), False
        chunks.append(data)


def raw_exchange(port: int, data: bytes, *, timeout: float = PROMPT, half_close: bool = False) -> RawResponse:
    """Send `data` on a fresh socket and read until the server closes or `timeout` passes."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        raw, timed_out = read_until_closed(sock, timeout)
    status, headers, body = parse_response(raw)
    return RawResponse(status, headers, body, raw, time.monotonic() - started, timed_out)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_contract_error(status: int, headers: dict[str, str], body: bytes, code: str | None = None) -> None:
    """The contract's error shape: {"error", "message", "details"} (+ retry_after_seconds / payload_id)."""
    assert headers.get("content-type") == "application/json", (status, body[:200])
    parsed = json.loads(body)
    assert ERROR_KEYS <= set(parsed) <= ERROR_KEYS | {"retry_after_seconds", "payload_id"}, parsed
    assert isinstance(parsed["message"], str)
    assert parsed["message"]
    assert isinstance(parsed["details"], dict)
    if code is not None:
        assert parsed["error"] == code, parsed


def normal_write(port: int, *, timeout: float = 10.0) -> tuple[Response, float]:
    """One well-formed write on a fresh connection; (response, seconds)."""
    started = time.monotonic()
    response = exchange(
        port,
        "POST",
        "/inbound/default",
        json.dumps({"normal": uuid.uuid4().hex}).encode(),
        post_headers(),
        timeout=timeout,
    )
    return response, time.monotonic() - started


def assert_still_serving(port: int) -> None:
    """/health answers 200 and a normal write 202, both promptly."""
    assert exchange(port, "GET", "/health", timeout=PROMPT).status == 200
    response, seconds = normal_write(port, timeout=PROMPT)
    assert response.status == 202, response.body
    assert seconds < NORMAL_LATENCY_LIMIT


# -- bodies ----------------------------------------------------------------------------


INVALID_JSON = {
    "truncated": b'{"n": 1',
    "trailing-garbage": b'{"n": 1} tail',
    "empty": b"",
    "nested-arrays-100k": b"[" * 100_000,
    "nested-objects-100k": b'{"a":' * 100_000,
    "exponent-1e999999": b'{"a": 1e999999}',
    "negative-exponent-overflow": b'{"a": -1e999999}',
    "integer-of-5000-digits": b'{"a": ' + b"9" * 5000 + b"}",
    "invalid-utf8": b'{"a": "\xff\xfe"}',
    "lone-surrogate-escape": b'{"a": "\\ud800"}',
    "raw-nul-in-string": b'{"a": "\x00"}',
    "single-quotes": b"{'a': 1}",
    "nan": b'{"a": NaN}',
}

NOT_AN_OBJECT = {
    "array": b"[1, 2]",
    "string": b'"text"',
    "null": b"null",
    "number": b"1e5",
}


class TestHostileBodies:
    """Bodies that are not one JSON object are 400 in the contract's shape, whatever they hold."""

    @pytest.mark.parametrize("body", list(INVALID_JSON.values()), ids=list(INVALID_JSON))
    def test_invalid_json_is_400_invalid_json(self, target: Target, body: bytes) -> None:
        """Malformed, absurdly nested, overflowing or non-UTF-8 JSON is 400 invalid_json, never a 5xx."""
        response = exchange(target.port, "POST", "/inbound/default", body, post_headers(), timeout=PROMPT)

        assert response.status == 400, response.body[:200]
        assert_contract_error(response.status, response.headers, response.body, "invalid_json")

    @pytest.mark.parametrize("body", list(NOT_AN_OBJECT.values()), ids=list(NOT_AN_OBJECT))
    def test_json_that_is_not_an_object_is_400_invalid_body(self, target: Target, body: bytes) -> None:
        """Valid JSON that is not an object is 400 invalid_body."""
        response = exchange(target.port, "POST", "/inbound/default", body, post_headers(), timeout=PROMPT)

        assert_contract_error(response.status, response.headers, response.body, "invalid_body")
        assert response.status == 400

    def test_a_malformed_chunked_body_is_400_not_500(self, target: Target) -> None:
        """A chunk size that is not hex is the request's fault: 400 invalid_body, not a 500 from the body read."""
        head = request_bytes("POST", "/inbound/default", headers={**auth(), "Transfer-Encoding": "chunked"})
        # request_bytes adds a Content-Length; a chunked request must not carry one.
        head = head.replace(b"Content-Length: 0\r\n", b"")

        response = raw_exchange(target.port, head + b"ZZZ\r\nabc\r\n0\r\n\r\n")

        assert response.status == 400, response.raw[:300]
        assert_contract_error(response.status, response.headers, response.body, "invalid_body")


# -- framing ---------------------------------------------------------------------------


class TestLyingContentLength:
    """A Content-Length that does not match the body never hangs the worker or stores more than was declared."""

    def test_a_content_length_shorter_than_the_body_stores_only_the_declared_bytes(self, target: Target) -> None:
        """The declared bytes are the request (202); the rest is parsed as a next request and refused, never 5xx."""
        marker = uuid.uuid4().hex
        declared = json.dumps({"m": marker}).encode()
        data = request_bytes("POST", "/inbound/default", declared, headers=auth(), close=False)
        data += b"TRAILING GARBAGE THAT IS NOT A REQUEST\r\n\r\n"

        response = raw_exchange(target.port, data)

        statuses = [int(line.split()[1]) for line in response.raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        assert statuses[0] == 202, response.raw[:500]
        assert all(s < 500 for s in statuses), statuses
        assert not response.timed_out
        payload_id = response.json()["payload_id"]
        wait_for(lambda: stored_payload(target.port, payload_id) is not None, 10, "the entry delivered")
        assert stored_payload(target.port, payload_id) == {"m": marker}

    def test_a_content_length_longer_than_the_body_then_close_is_answered_or_dropped(self, target: Target) -> None:
        """Declared 100 bytes, sent 5, then the client stops sending: 400 invalid_body at once, naming both sizes."""
        data = request_bytes("POST", "/inbound/default", b'{"n":', headers=auth(), content_length=100)

        response = raw_exchange(target.port, data, half_close=True)

        assert not response.timed_out
        assert response.status == 400, response.raw[:300]
        assert_contract_error(response.status, response.headers, response.body, "invalid_body")
        assert json.loads(response.body)["details"] == {"content_length": 100, "received": 5}

    def test_a_silent_client_with_a_long_content_length_blocks_nobody(self, target: Target) -> None:
        """Declared 100 bytes, sent 5, then silence: the client's wait is bounded, others are served meanwhile."""
        data = request_bytes("POST", "/inbound/default", b'{"n":', headers=auth(), content_length=100)
        with socket.create_connection((HOST, target.port), timeout=PROMPT) as sock:
            sock.sendall(data)
            # While the worker waits for the rest of that body, others are served at once
            for _ in range(5):
                response, seconds = normal_write(target.port, timeout=PROMPT)
                assert response.status == 202, response.body
                assert seconds < NORMAL_LATENCY_LIMIT
            # ... and the silent client gets no answer: its own wait ends at its deadline
            raw, timed_out = read_until_closed(sock, 1.0)
            assert timed_out
            assert raw == b""
        assert_still_serving(target.port)


def stored_payload(port: int, payload_id: str) -> Any:
    """The payload of `payload_id` as /query returns it, or None while it is not delivered."""
    response = exchange(port, "GET", "/query/default?limit=1000", headers=admin_headers())
    assert response.status == 200, response.body
    for record in response.json()["records"]:
        if record["payload_id"] == payload_id:
            return record["payload"]
    return None


class TestBodyTimeout:
    """NEXUS_BODY_TIMEOUT: a body that stops arriving is answered 408 and frees its connection."""

    def test_a_body_that_stops_arriving_is_408_and_its_connection_is_closed(
        self, launcher: Launcher, tmp_path: Path
    ) -> None:
        """Content-Length 100 and 6 bytes sent: 408 request_timeout after the timeout, then the server closes."""
        # Given a service with a one-second body timeout
        server = launcher(workers=1, env={"NEXUS_BODY_TIMEOUT": "1"}, data_dir=tmp_path / "body-timeout")
        server.wait_ready()
        head = request_bytes("POST", "/inbound/default", b'{"n": ', headers=auth(), content_length=100, close=False)
        # When a client sends the start of its body and then nothing
        with socket.create_connection((HOST, server.port), timeout=PROMPT) as sock:
            sock.sendall(head)
            raw, timed_out = read_until_closed(sock, 15.0)
        # Then it is answered 408 in the API's shape, and the connection is closed (not kept waiting)
        assert not timed_out, raw[:300]
        status, headers, body = parse_response(raw)
        assert status == 408, raw[:300]
        assert_contract_error(status, headers, body, "request_timeout")
        # ... and nothing was stored
        status_body = exchange(server.port, "GET", "/admin/status", headers=admin_headers()).json()
        assert status_body["wal"]["pending"] == 0


class TestOversizedBodies:
    """Bodies over NEXUS_MAX_BODY_BYTES are refused with 413, without being read."""

    def test_a_declared_100_mb_body_is_413_before_it_is_sent(self, target: Target) -> None:
        """Content-Length 100 MB with a few bytes sent: 413 payload_too_large at once, not after reading 100 MB."""
        data = request_bytes("POST", "/inbound/default", b'{"n":', headers=auth(), content_length=100_000_000)

        response = raw_exchange(target.port, data)

        assert response.status == 413, response.raw[:300]
        assert response.seconds < PROMPT
        assert_contract_error(response.status, response.headers, response.body, "payload_too_large")

    def test_a_body_one_byte_over_the_limit_is_413(self, target: Target) -> None:
        """A body of the limit + 1 bytes is refused with 413 in the contract's shape."""
        body = b'{"a": "' + b"x" * (MAX_BODY_BYTES - 8) + b'"}'
        assert len(body) == MAX_BODY_BYTES + 1

        response = exchange(target.port, "POST", "/inbound/default", body, post_headers(), timeout=10)

        assert response.status == 413
        assert_contract_error(response.status, response.headers, response.body, "payload_too_large")


# -- slow and many clients ----------------------------------------------------------------


class SlowClient(threading.Thread):
    """Sends a whole write one header byte every SLOW_BYTE_INTERVAL for SLOW_BYTES bytes, then the rest."""

    def __init__(self, port: int) -> None:
        super().__init__(name="slow-client", daemon=True)
        self.port = port
        self.response: RawResponse | None = None
        self.error: BaseException | None = None
        self._pace = threading.Event()  # never set: only paces the bytes

    def run(self) -> None:
        try:
            data = request_bytes("POST", "/inbound/default", b'{"slow": true}', headers=auth())
            started = time.monotonic()
            with socket.create_connection((HOST, self.port), timeout=30) as sock:
                for i in range(SLOW_BYTES):
                    sock.sendall(data[i : i + 1])
                    self._pace.wait(SLOW_BYTE_INTERVAL)
                sock.sendall(data[SLOW_BYTES:])
                raw, timed_out = read_until_closed(sock, 10)
            status, headers, body = parse_response(raw)
            self.response = RawResponse(status, headers, body, raw, time.monotonic() - started, timed_out)
        except BaseException as exc:
            self.error = exc


class TestSlowClients:
    """A client that trickles its request holds only its own connection."""

    def test_a_client_sending_a_byte_per_100_ms_does_not_block_others(self, target: Target) -> None:
        """While one client sends a header byte every 100 ms (3 s), other writes complete promptly; it gets its 202."""
        slow = SlowClient(target.port)
        slow.start()
        latencies: list[float] = []
        while slow.is_alive() and len(latencies) < 200:
            response, seconds = normal_write(target.port, timeout=PROMPT)
            assert response.status == 202, response.body
            latencies.append(seconds)
        slow.join(30)

        assert slow.error is None, slow.error
        assert slow.response is not None
        assert slow.response.status == 202, slow.response.raw[:300]
        assert len(latencies) >= 10
        assert max(latencies) < NORMAL_LATENCY_LIMIT, max(latencies)


def open_connections(port: int, count: int) -> list[socket.socket]:
    """`count` sockets: a third idle, a third with half a request, a third keep-alive after a full request."""
    sockets: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection((HOST, port), timeout=10)
            sockets.append(sock)
            if i % 3 == 1:
                sock.sendall(b"POST /inbound/default HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            elif i % 3 == 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for sock in sockets[2::3]:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, "a keep-alive connection was closed"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head[:100]
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()


class TestManyConnections:
    """A thousand connections at once, most doing nothing, do not shut others out."""

    def test_a_thousand_open_connections_leave_room_for_normal_writes(self, launcher: Launcher, tmp_path: Path) -> None:
        """1000 sockets (idle, half-sent, kept alive) open while normal writes get 202; closing them is harmless."""
        # Given two workers (1000 connections each, gunicorn.conf.py's worker_connections)
        server = launcher(workers=2, data_dir=tmp_path / "data")
        server.wait_ready()
        # When a thousand connections are held open, most of them doing nothing
        sockets = open_connections(server.port, CONNECTIONS)
        try:
            # Then normal writes still succeed
            for _ in range(20):
                response, _seconds = normal_write(server.port, timeout=10)
                assert response.status == 202, response.body
        finally:
            close_all(sockets)
        # ... and once they are closed the service answers as before, with the same workers
        assert_still_serving(server.port)
        assert len(server.worker_pids()) == 2
        code, _ = server.stop()
        assert code == 0, server.log_tail()


# -- paths and headers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Trick:
    """A request with a path or header trick, the status it must get, and the error code if the app answers."""

    data: Callable[[], bytes]
    status: int
    code: str | None


def _post(target: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Callable[[], bytes]:
    return lambda: request_bytes("POST", target, b'{"n": 1}', headers=auth() if headers is None else headers, **kwargs)


def _get(target: str, headers: dict[str, str]) -> Callable[[], bytes]:
    return lambda: request_bytes("GET", target, headers=headers)


def _with_raw_headers(extra: str) -> Callable[[], bytes]:
    """A valid write with `extra` header lines spliced in, byte for byte."""

    def build() -> bytes:
        data = request_bytes("POST", "/inbound/default", b'{"n": 1}', headers=auth())
        return data.replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\n" + extra.encode("latin-1"), 1)

    return build


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

TRICKS: dict[str, Trick] = {
    # Encoded slashes and dot segments never reach another route.
    "encoded-dot-dot-slashes": Trick(_post("/inbound/..%2f..%2fetc"), 404, "not_found"),
    "dot-dot-segments-to-admin": Trick(_post("/inbound/default/../admin/status"), 404, "not_found"),
    "dot-dot-from-admin-to-inbound": Trick(_get("/admin/status/../../inbound/default", ADMIN), 404, "not_found"),
    "encoded-traversal-in-retry-id": Trick(
        _post("/admin/dead-letters/..%2f..%2fetc%2fpasswd/retry", ADMIN), 404, "not_found"
    ),
    # Source names that are no source: 404 after authentication, 401 before it.
    "encoded-nul-in-source": Trick(_post("/inbound/default%00"), 404, "unknown_source"),
    "encoded-nul-in-source-without-token": Trick(_post("/inbound/default%00", headers={}), 401, "unauthorized"),
    "encoded-invalid-utf8-in-source": Trick(_post("/inbound/d%FFfault"), 404, "unknown_source"),
    "source-name-of-1000-characters": Trick(_post("/inbound/" + "s" * 1000), 404, "unknown_source"),
    "source-name-of-5000-characters": Trick(_post("/inbound/" + "s" * 5000), 414, None),
    "raw-nul-in-request-line": Trick(_post("/inbound/def\x00ault"), 400, None),
    # Authorization: one header, one bearer token.
    "duplicated-authorization-same-token": Trick(_with_raw_headers(f"Authorization: Bearer {TOKEN}\r\n"), 401, None),
    "duplicated-authorization-other-token": Trick(_with_raw_headers("Authorization: Bearer garbage\r\n"), 401, None),
    "basic-scheme": Trick(_post("/inbound/default", {"Authorization": "Basic Zm9vOmJhcg=="}), 401, "unauthorized"),
    "bearer-without-token": Trick(_post("/inbound/default", {"Authorization": "Bearer "}), 401, "unauthorized"),
    # Headers the parser or the app refuses.
    "control-character-in-subject": Trick(_with_raw_headers("X-Subject: a\x01b\r\n"), 400, None),
    "idempotency-key-of-300-characters": Trick(
        _post("/inbound/default", {**auth(), "Idempotency-Key": "k" * 300}), 400, "invalid_idempotency_key"
    ),
    "non-ascii-subject": Trick(_post("/inbound/default", {**auth(), "X-Subject": "caf\xe9"}), 400, "invalid_subject"),
    "two-content-lengths": Trick(_with_raw_headers("Content-Length: 3\r\n"), 400, None),
    "negative-content-length": Trick(_post("/inbound/default", content_length=-1), 400, None),
    "header-of-9000-bytes": Trick(_with_raw_headers("X-Big: " + "b" * 9000 + "\r\n"), 431, None),
    "query-limit-past-int64": Trick(_get("/query/default?limit=99999999999999999999999", auth()), 400, "invalid_limit"),
    "query-cursor-of-garbage": Trick(_get("/query/default?after=%00%FF", auth()), 400, "invalid_cursor"),
    # str.isdigit() takes these, int() does not (or takes them as a number nobody meant).
    "query-limit-superscript-two": Trick(_get("/query/default?limit=%C2%B2", auth()), 400, "invalid_limit"),
    "query-limit-circled-one": Trick(_get("/query/default?limit=%E2%91%A0", auth()), 400, "invalid_limit"),
    "query-limit-fullwidth-one": Trick(_get("/query/default?limit=%EF%BC%91", auth()), 400, "invalid_limit"),
    "two-idempotency-keys": Trick(
        _post("/inbound/default", headers={**auth(), "Idempotency-Key": "k1", "idempotency-key": "k2"}),
        400,
        "invalid_idempotency_key",
    ),
}


class TestPathAndHeaderTricks:
    """Path tricks and odd headers get a clean 4xx, in the contract's shape whenever the app answers."""

    @pytest.mark.parametrize("trick", list(TRICKS.values()), ids=list(TRICKS))
    def test_a_trick_is_answered_with_a_clean_4xx(self, target: Target, trick: Trick) -> None:
        """The expected 4xx, promptly; in the contract's error shape when the app (not gunicorn's parser) answers."""
        response = raw_exchange(target.port, trick.data())

        assert not response.timed_out, response.raw[:300]
        assert response.status == trick.status, response.raw[:300]
        if trick.code is not None:
            assert_contract_error(response.status, response.headers, response.body, trick.code)
        elif response.headers.get("content-type") == "application/json":
            assert_contract_error(response.status, response.headers, response.body)


# -- OpenAPI fuzzing -----------------------------------------------------------------------

OPENAPI = ROOT / "docs" / "openapi.yaml"


@dataclass(frozen=True)
class FuzzCase:
    """One operation of docs/openapi.yaml, fuzzed in one generation mode, with fixed path parameters."""

    method: str
    path: str
    mode: GenerationMode
    path_parameters: dict[str, str] | None = None

    @property
    def id(self) -> str:
        fixed = "fixed" if self.path_parameters else "any"
        return f"{self.method} {self.path} {self.mode.value} {fixed}-path"


# Negative generation needs something to negate: it is used where an operation has
# typed parameters or a body. Fixed path parameters aim the cases at a source and a
# destination that exist, so they go past the 404 and exercise the handler.
FUZZ_CASES = [
    FuzzCase("POST", "/inbound/{source}", GenerationMode.POSITIVE, {"source": "default"}),
    FuzzCase("POST", "/inbound/{source}", GenerationMode.NEGATIVE, {"source": "default"}),
    FuzzCase("POST", "/inbound/{source}", GenerationMode.POSITIVE),
    FuzzCase("GET", "/query/{destination}", GenerationMode.POSITIVE, {"destination": "default"}),
    FuzzCase("GET", "/query/{destination}", GenerationMode.NEGATIVE, {"destination": "default"}),
    FuzzCase("GET", "/query/{destination}", GenerationMode.POSITIVE),
    FuzzCase("GET", "/health", GenerationMode.POSITIVE),
    FuzzCase("GET", "/ready", GenerationMode.POSITIVE),
    FuzzCase("GET", "/metrics", GenerationMode.POSITIVE),
    FuzzCase("GET", "/admin/status", GenerationMode.POSITIVE),
    FuzzCase("GET", "/admin/dead-letters", GenerationMode.POSITIVE),
    FuzzCase("GET", "/admin/dead-letters", GenerationMode.NEGATIVE),
    FuzzCase("POST", "/admin/dead-letters/{payload_id}/retry", GenerationMode.POSITIVE),
    FuzzCase("POST", "/v1/logs", GenerationMode.POSITIVE),
    FuzzCase("POST", "/v1/logs", GenerationMode.NEGATIVE),
]
#: The paths written with the source's token; every other one is fuzzed with the admin's.
SOURCE_PATHS = frozenset({"/inbound/{source}", "/v1/logs"})

#: Status code, content type, headers and body schema as documented, and never a 5xx;
#: negative cases must also be refused (4xx).
FUZZ_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class TestOpenApiFuzz:
    """schemathesis cases from docs/openapi.yaml: no 5xx, and every answer matches the document."""

    @pytest.mark.parametrize("case", FUZZ_CASES, ids=[c.id for c in FUZZ_CASES])
    def test_generated_requests_get_documented_answers(self, target: Target, case: FuzzCase) -> None:
        """Generated requests get documented statuses, content types, headers and bodies; errors in the shape."""
        schema = schemathesis.openapi.from_path(str(OPENAPI))
        operation = schema[case.path][case.method.lower()]
        token = TOKEN if case.path in SOURCE_PATHS else ADMIN_TOKEN
        strategy = operation.as_strategy(
            generation_mode=case.mode,
            headers={"Authorization": f"Bearer {token}"},
            path_parameters=case.path_parameters,
        )
        base_url = f"http://{HOST}:{target.port}"
        seen: set[int] = set()

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(generated=strategy)
        def fuzz(generated: schemathesis.Case[Any]) -> None:
            response = generated.call(base_url=base_url, timeout=10)
            seen.add(response.status_code)
            generated.validate_response(response, checks=FUZZ_CHECKS)
            # schemathesis keeps headers as lowercase names with lists of values
            headers = {name: values[0] for name, values in response.headers.items() if values}
            if response.status_code == 414:
                # gunicorn's own refusal of a request line past 4094 bytes (documented as such)
                assert headers.get("content-type") == "text/html"
            elif response.status_code >= 400:
                assert_contract_error(response.status_code, headers, response.content)

        fuzz()
        assert seen, "no request was made"
        assert max(seen) < 500, seen


# -- afterwards ----------------------------------------------------------------------------


class TestAfterTheAbuse:
    """Runs last: the worker that took every abuse above is still the one serving."""

    def test_the_same_worker_still_serves_and_never_answered_500(self, target: Target) -> None:
        """After all of the above: /health 200, a write 202, the same worker pid, no 500 and no request_failed."""
        assert_still_serving(target.port)

        assert target.server.worker_pids() == [target.worker]
        assert target.server.proc.poll() is None
        requests = target.server.events("request")
        assert requests
        assert [r for r in requests if int(r.get("status", 0)) >= 500] == []
        assert target.server.events("request_failed") == []
