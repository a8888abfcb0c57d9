"""Bodies and credentials as real clients send them (issue 13): compressed bodies, JSON's media types, Basic auth.

In-process tests run a real `Service` behind `falcon.testing.TestClient` (the
Harness and Node of tests/test_http.py); the last class posts to a real gunicorn
through `http.client`, as a client on the wire would.
"""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import base64
import gzip
import http.client
import os
import sqlite3
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.proc import HOST, Gunicorn, Launcher, ready, wait_delivered
from tests.support.proc import TOKEN as PROCESS_TOKEN
from tests.test_http import ADMIN_TOKEN, TOKEN, Harness, Node, assert_error

#: A limit small enough for a test body to cross it by a few bytes.
SMALL_LIMIT = 256
#: The codings a 415 for Content-Encoding must list (RFC 9110 section 12.5.3).
ACCEPT_ENCODING = "gzip, x-gzip, deflate"
#: A gzip bomb: this many zero bytes compress to about 10 kB.
BOMB_SIZE = 10_000_000
#: The bomb is posted with this limit: far under what it inflates to.
BOMB_LIMIT = 1_048_576


def compress(data: bytes, coding: str) -> bytes:
    """`data` in a Content-Encoding: gzip, deflate (zlib format) or raw deflate (no zlib wrapper)."""
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return raw.compress(data) + raw.flush()


def basic(user: str, password: str) -> dict[str, str]:
    credential = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {credential}"}


@pytest.fixture
def small(harness: Harness) -> Node:
    return harness.start({"NEXUS_MAX_BODY_BYTES": str(SMALL_LIMIT)})


def assert_nothing_stored(node: Node) -> None:
    """Nothing reached the WAL, so nothing will ever be delivered."""
    assert node.wal_pending == 0
    assert node.rows() == []


class TestContentEncoding:
    """gzip, x-gzip and deflate bodies are decoded before parsing; the decoded bytes are what is stored."""

    @pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate"])
    def test_a_compressed_body_is_stored_decoded_byte_for_byte(self, node: Node, coding: str) -> None:
        """A body sent gzip, x-gzip, deflate (zlib) or raw deflate is stored as exactly the bytes it decodes to."""
        # Given a JSON body with spacing and non-ASCII text, which a re-serialisation would change
        decoded = '{ "reading" : [1, 2.50, 3],  "unit": "°C" }'.encode()
        header = "deflate" if coding == "raw-deflate" else coding
        # When it is posted compressed, with its Content-Encoding
        payload_id = node.accepted(body=compress(decoded, coding), headers={"Content-Encoding": header})
        # Then the stored row holds the decoded bytes, unchanged
        node.wait_delivered([payload_id])
        [row] = node.rows()
        assert row["payload"].encode() == decoded

    def test_the_coding_name_is_case_insensitive_and_identity_is_no_coding(self, node: Node) -> None:
        """`GZIP` is gzip (RFC 9110 section 8.4.1), and `identity` (alone or before gzip) adds no coding."""
        # Given the same body sent three ways
        plain = b'{"n": 1}'
        # When it is posted as GZIP, identity, and "identity, gzip"
        upper = node.post(body=gzip.compress(plain), headers={"Content-Encoding": "GZIP"})
        identity = node.post(body=plain, headers={"Content-Encoding": "identity"})
        identity_then_gzip = node.post(body=gzip.compress(plain), headers={"Content-Encoding": "identity, gzip"})
        # Then each is accepted and all three store the same bytes
        ids = [r.json["payload_id"] for r in (upper, identity, identity_then_gzip)]
        assert [r.status_code for r in (upper, identity, identity_then_gzip)] == [202, 202, 202]
        node.wait_delivered(ids)
        assert [row["payload"].encode() for row in node.rows()] == [plain] * 3

    def test_a_gzip_body_of_several_members_is_decoded_whole(self, node: Node) -> None:
        """Concatenated gzip members (RFC 1952 section 2.2) decode to the concatenation of their contents."""
        # Given a body split over two gzip members
        body = gzip.compress(b'{"first": ') + gzip.compress(b'"second"}')
        # When it is posted as gzip
        payload_id = node.accepted(body=body, headers={"Content-Encoding": "gzip"})
        # Then the row holds both halves
        node.wait_delivered([payload_id])
        assert node.rows()[0]["payload"] == '{"first": "second"}'

    def test_a_decoded_body_of_exactly_the_limit_is_accepted(self, small: Node) -> None:
        """NEXUS_MAX_BODY_BYTES bounds the decoded body: exactly the limit, decoded, is accepted."""
        decoded = b'{"pad": "' + b"x" * (SMALL_LIMIT - 11) + b'"}'
        assert len(decoded) == SMALL_LIMIT

        result = small.post(body=gzip.compress(decoded), headers={"Content-Encoding": "gzip"})

        assert result.status_code == 202, result.text

    def test_a_small_body_decoding_past_the_limit_is_413(self, small: Node) -> None:
        """A compressed body well under the limit that decodes to one byte over it answers 413, naming the limit."""
        # Given a body of limit + 1 bytes, compressed far below the limit
        decoded = b'{"pad": "' + b"x" * (SMALL_LIMIT - 10) + b'"}'
        sent = gzip.compress(decoded)
        assert len(sent) < SMALL_LIMIT // 2
        # When it is posted as gzip
        result = small.post(body=sent, headers={"Content-Encoding": "gzip"})
        # Then it is refused for its decoded size, and nothing is stored
        body = assert_error(result, 413, "payload_too_large")
        assert body["details"] == {"max_body_bytes": SMALL_LIMIT, "content_encoding": "gzip"}
        assert_nothing_stored(small)

    def test_the_compressed_body_on_the_wire_is_bounded_too(self, small: Node) -> None:
        """A compressed body itself over NEXUS_MAX_BODY_BYTES answers 413 before anything is decoded."""
        # Given random bytes, which do not compress: the gzip body is larger than the limit
        sent = gzip.compress(os.urandom(SMALL_LIMIT * 2))
        # When it is posted as gzip
        result = small.post(body=sent, headers={"Content-Encoding": "gzip"})
        # Then the raw body's own limit answers
        body = assert_error(result, 413, "payload_too_large")
        assert body["details"] == {"max_body_bytes": SMALL_LIMIT}

    def test_a_gzip_bomb_is_413_without_the_memory_it_inflates_to(self, harness: Harness) -> None:
        """10 MB of zeros gzipped to ~10 kB answers 413, and Python's peak memory stays near the 1 MiB limit."""
        # Given a body of about 10 kB that inflates to 10 MB
        node = harness.start({"NEXUS_MAX_BODY_BYTES": str(BOMB_LIMIT)})
        bomb = gzip.compress(bytes(BOMB_SIZE))
        assert len(bomb) < 20_000
        # When it is posted as gzip, memory traced
        tracemalloc.start()
        try:
            result = node.post(body=bomb, headers={"Content-Encoding": "gzip"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Then it is refused, and at no point did the worker hold the inflated body
        assert_error(result, 413, "payload_too_large")
        # The limit, plus zlib's output buffer for it: far below the 10 MB it would inflate to.
        assert peak < 4 * BOMB_LIMIT, f"peak {peak} bytes"
        assert_nothing_stored(node)

    def test_decoding_stops_at_the_limit_not_at_the_end_of_the_stream(self, harness: Harness) -> None:
        """A bomb whose stream is cut short answers 413, not 400: decoding stopped at the limit, before the cut."""
        # Given a 10 MB bomb without its last 1000 bytes (so its end would not decode)
        node = harness.start({"NEXUS_MAX_BODY_BYTES": str(BOMB_LIMIT)})
        cut = gzip.compress(bytes(BOMB_SIZE))[:-1000]
        # When it is posted as gzip
        result = node.post(body=cut, headers={"Content-Encoding": "gzip"})
        # Then the limit answered first: the 9 MB after it were never decoded
        assert_error(result, 413, "payload_too_large")

    @pytest.mark.parametrize(
        ("coding", "body"),
        [
            ("gzip", gzip.compress(b'{"n": 1}')[:-4]),
            ("gzip", gzip.compress(b'{"n": 1}')[:12]),
            ("gzip", b"\x1f\x8b\x08\x00garbage that is not deflate"),
            ("gzip", b'{"n": 1}'),
            ("x-gzip", b'{"n": 1}'),
            ("gzip", gzip.compress(b'{"n": 1}') + b"trailing garbage"),
            ("gzip", gzip.compress(b'{"n": 1}')[:-8] + b"\x00\x00\x00\x00" + gzip.compress(b'{"n": 1}')[-4:]),
            ("gzip", b""),
            ("deflate", zlib.compress(b'{"n": 1}')[:-2]),
            ("deflate", b'{"n": 1}'),
            ("deflate", zlib.compress(b'{"n": 1}') + b"x"),
        ],
        ids=[
            "gzip-truncated-trailer",
            "gzip-truncated-stream",
            "gzip-garbage",
            "plain-json-labelled-gzip",
            "plain-json-labelled-x-gzip",
            "gzip-trailing-garbage",
            "gzip-bad-crc",
            "gzip-empty",
            "deflate-truncated",
            "plain-json-labelled-deflate",
            "deflate-trailing-garbage",
        ],
    )
    def test_a_body_that_does_not_decode_is_400_invalid_encoding(self, node: Node, coding: str, body: bytes) -> None:
        """Truncated, corrupt, trailing-garbage or plain bodies labelled with a coding answer 400 invalid_encoding."""
        result = node.post(body=body, headers={"Content-Encoding": coding})

        error = assert_error(result, 400, "invalid_encoding")
        assert error["details"]["content_encoding"] == coding
        assert_nothing_stored(node)

    @pytest.mark.parametrize("header", ["br", "gzip, br", "gzip, gzip", "zstd", "compress", "deflate, gzip"])
    def test_another_coding_or_several_codings_are_415_with_accept_encoding(self, node: Node, header: str) -> None:
        """Any other coding, or more than one, answers 415 with Accept-Encoding listing gzip, x-gzip and deflate."""
        result = node.post(body=gzip.compress(b'{"n": 1}'), headers={"Content-Encoding": header})

        error = assert_error(result, 415, "unsupported_encoding")
        assert result.headers["Accept-Encoding"] == ACCEPT_ENCODING
        assert error["details"]["accepted_encodings"] == ["gzip", "x-gzip", "deflate"]
        assert_nothing_stored(node)


class TestContentTypes:
    """JSON's media types are accepted; form types and text stay 415, naming what is accepted."""

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("application/json; charset=utf-8", b'{"n": 1}'),
            ("application/vnd.api+json", b'{"n": 1}'),
            ("application/problem+json; charset=utf-8", b'{"n": 1}'),
        ],
        ids=["json-charset", "vnd-api-json", "plus-json-parameters"],
    )
    def test_json_media_types_are_accepted_as_one_entry(self, node: Node, content_type: str, body: bytes) -> None:
        """application/json with parameters and any application/*+json are each one stored entry."""
        payload_id = node.accepted(body=body, content_type=content_type)

        node.wait_delivered([payload_id])
        assert [orjson.loads(row["payload"]) for row in node.rows()] == [{"n": 1}]

    @pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl"])
    def test_one_ndjson_line_is_a_batch_of_one(self, node: Node, content_type: str) -> None:
        """One NDJSON line under either NDJSON type is a batch of one stored entry, answered with payload_ids."""
        result = node.post(body=b'{"n": 1}\n', headers={"Content-Type": content_type})

        assert result.status_code == 202, result.text
        (payload_id,) = result.json["payload_ids"]
        node.wait_delivered([payload_id])
        assert [orjson.loads(row["payload"]) for row in node.rows()] == [{"n": 1}]

    @pytest.mark.parametrize(
        "content_type",
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "text/json",
            "application/+json",
        ],
    )
    def test_other_media_types_are_415_naming_the_accepted_ones(self, node: Node, content_type: str) -> None:
        """Form types, text and anything else answer 415, the message listing every accepted media type."""
        result = node.post({"n": 1}, content_type=content_type)

        error = assert_error(result, 415, "unsupported_media_type")
        for accepted in ("application/json", "application/*+json", "application/x-ndjson", "application/jsonl"):
            assert accepted in error["message"]
        assert_nothing_stored(node)


class TestBasicAuth:
    """The token as the password of Basic authentication (RFC 7617), with any user name, works like Bearer."""

    @pytest.mark.parametrize("user", ["", "nexus", "logstash", "ünï code"], ids=["empty", "nexus", "other", "unicode"])
    def test_the_token_as_basic_password_writes_whatever_the_user_name(self, node: Node, user: str) -> None:
        """Basic with the source token as the password answers 202, whatever the user name."""
        result = node.post({"n": 1}, token=None, headers=basic(user, TOKEN))

        assert result.status_code == 202, result.text

    def test_the_admin_token_as_basic_password_reads_admin_endpoints(self, node: Node) -> None:
        """Basic works wherever Bearer does: the admin token as the password reads /admin/status."""
        result = node.client.simulate_get("/admin/status", headers=basic("admin", ADMIN_TOKEN))

        assert result.status_code == 200, result.text

    @pytest.mark.parametrize(
        "authorization",
        [
            basic("nexus", "wrong-password")["Authorization"],
            basic(TOKEN, "")["Authorization"],
            "Basic " + base64.b64encode(TOKEN.encode()).decode(),
            "Basic not%base64!",
            "Basic " + base64.b64encode(b"user:\xff\xfe").decode(),
            "Basic",
        ],
        ids=["wrong-password", "token-as-user", "no-colon", "bad-base64", "not-utf8", "no-credential"],
    )
    def test_a_wrong_or_malformed_basic_credential_is_401_naming_both_schemes(
        self, node: Node, authorization: str
    ) -> None:
        """A wrong password, or Basic that is not base64 of "user:password", answers 401 offering Bearer and Basic."""
        result = node.post({"n": 1}, token=None, headers={"Authorization": authorization})

        assert_error(result, 401, "unauthorized")
        assert result.headers["WWW-Authenticate"] == 'Bearer realm="nexus", Basic realm="nexus"'
        assert_nothing_stored(node)


class TestXIdempotencyKey:
    """X-Idempotency-Key is the key when Idempotency-Key is absent; two different keys are 400."""

    def test_x_idempotency_key_dedups_like_idempotency_key(self, node: Node) -> None:
        """A resend with the same X-Idempotency-Key answers 200 duplicate with the original id; one row, keyed."""
        original = node.accepted({"n": 1}, headers={"X-Idempotency-Key": "order-7"})

        again = node.post({"n": 1}, headers={"X-Idempotency-Key": "order-7"})

        assert again.status_code == 200
        assert again.json == {"payload_id": original, "status": "duplicate"}
        node.wait_delivered([original])
        node.wait_settled()
        [row] = node.rows()
        assert row["idempotency_key"] == "order-7"

    def test_the_two_headers_name_one_key_space(self, node: Node) -> None:
        """A key first sent as X-Idempotency-Key is a duplicate resent as Idempotency-Key, or as both at once."""
        original = node.accepted({"n": 1}, headers={"X-Idempotency-Key": "shared"})

        resent = node.post({"n": 1}, headers={"Idempotency-Key": "shared"})
        both = node.post({"n": 1}, headers={"Idempotency-Key": "shared", "X-Idempotency-Key": "shared"})

        assert resent.json == {"payload_id": original, "status": "duplicate"}
        assert both.json == {"payload_id": original, "status": "duplicate"}

    def test_different_keys_in_the_two_headers_are_400(self, node: Node) -> None:
        """Idempotency-Key and X-Idempotency-Key naming different keys answer 400 invalid_idempotency_key."""
        result = node.post({"n": 1}, headers={"Idempotency-Key": "a", "X-Idempotency-Key": "b"})

        assert_error(result, 400, "invalid_idempotency_key")
        assert_nothing_stored(node)

    @pytest.mark.parametrize("key", ["k" * 256, "has space", "k1,k2", ""], ids=["too-long", "space", "comma", "empty"])
    def test_a_malformed_x_idempotency_key_is_400(self, node: Node, key: str) -> None:
        """X-Idempotency-Key is validated as Idempotency-Key is: 1 to 255 visible ASCII characters, no comma."""
        result = node.post({"n": 1}, headers={"X-Idempotency-Key": key})

        assert_error(result, 400, "invalid_idempotency_key")
        assert_nothing_stored(node)


def stored_payload(db_path: Path, payload_id: str) -> str:
    conn = sqlite3.connect(db_path)
    try:
        [(payload,)] = conn.execute("SELECT payload FROM nexus_entries WHERE payload_id = ?", (payload_id,)).fetchall()
    finally:
        conn.close()
    return str(payload)


def post_and_check_decoded(server: Gunicorn, body: object, decoded: bytes, **request: Any) -> None:
    """POST `body` gzip-labelled through a plain http.client connection; 202, and the row holds `decoded`."""
    headers = {
        "Authorization": f"Bearer {PROCESS_TOKEN}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        conn.request("POST", "/inbound/default", body=body, headers=headers, **request)  # type: ignore[arg-type]
        response = conn.getresponse()
        answer = orjson.loads(response.read())
    finally:
        conn.close()
    assert response.status == 202, answer
    wait_delivered(server.db_path, [answer["payload_id"]])
    assert stored_payload(server.db_path, answer["payload_id"]).encode() == decoded


@pytest.mark.process
class TestCompressedOverTheWire:
    """Under real gunicorn, compressed bodies sent by a plain http.client connection are stored decoded."""

    DECODED = '{"shipper": "http.client", "line": "ünïcode"}'.encode()

    def test_a_gzip_body_with_content_length_is_stored_decoded(self, launch: Launcher) -> None:
        """A gzip body with Content-Encoding and Content-Length, through gunicorn, is stored as its decoded bytes."""
        # Given a running gunicorn; When a gzip body is posted with its Content-Encoding and Content-Length;
        # Then it is accepted and the row holds the decoded bytes
        post_and_check_decoded(ready(launch(workers=1)), gzip.compress(self.DECODED), self.DECODED)

    def test_a_chunked_gzip_body_is_stored_decoded(self, launch: Launcher) -> None:
        """A gzip body sent with Transfer-Encoding: chunked, in several chunks, is stored as its decoded bytes."""
        # Given a running gunicorn and a gzip body cut into three chunks
        sent = gzip.compress(self.DECODED)
        chunks = [sent[:5], sent[5:20], sent[20:]]
        # When it is posted chunked (no Content-Length); Then it is accepted and the row holds the decoded bytes
        post_and_check_decoded(ready(launch(workers=1)), iter(chunks), self.DECODED, encode_chunked=True)
