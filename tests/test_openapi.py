"""docs/openapi.yaml: a valid OpenAPI 3.0 document, and a client built from it alone works.

The document is checked against the OpenAPI 3.0 meta-schema that schemathesis bundles
(the validator its loader runs), and for what the issue asks of it: an operationId on
every operation, timestamps typed as date-times, 405 listed, the 429's two meanings.

"A client generated from it must still work": no generator is installed, so the client
here is schemathesis driven by the document only. For each operation, found by its
operationId, a request is built from the operation's path template, parameters, media
type and security scheme, sent to a real gunicorn, and its answer checked against the
document: a documented status, content type, headers and body schema. A method a path
does not serve is checked against the same operation's documented 405.
"""

# The tokens here are test fixtures, not credentials.
from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import schemathesis
import yaml  # type: ignore[import-untyped]  # PyYAML comes with schemathesis; its stubs are not installed
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import HttpMethod
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_30_VALIDATOR
from schemathesis.specs.openapi.schemas import OpenApiSchema
from schemathesis.transport.asgi import ASGI_TRANSPORT
from schemathesis.transport.requests import REQUESTS_TRANSPORT
from schemathesis.transport.wsgi import WSGI_TRANSPORT

from tests.support.proc import (
    ADMIN_TOKEN,
    HOST,
    ROOT,
    TOKEN,
    Gunicorn,
    Launcher,
    poisoned,
    ready,
    wait_delivered,
    wait_for,
)

OPENAPI = ROOT / "docs" / "openapi.yaml"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
#: Documented status, content type, headers and body schema, and never a 5xx.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: Two attempts, 50 ms apart: a refused entry is a dead letter in well under a second.
DEAD_LETTER_ENV = {"NEXUS_MAX_ATTEMPTS": "2", "NEXUS_INITIAL_BACKOFF": "0.05"}
POISON = "openapi-poison-marker"
#: The operations that take a source's token; every other secured one wants the admin's.
SOURCE_OPERATIONS = frozenset({"writeEntries", "queryEntries", "exportLogs"})
#: An OTLP/JSON ExportLogsServiceRequest of one log record.
OTLP_EXPORT = {
    "resourceLogs": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "openapi"}}]},
            "scopeLogs": [{"logRecords": [{"severityNumber": 9, "body": {"stringValue": "from the document"}}]}],
        }
    ]
}
#: The batch media types the document gives a string body; schemathesis has no serializer for them.
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl")


def raw_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, method, operation) for every operation of the document."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def resolve(document: dict[str, Any], ref: str) -> Any:
    """The node a local `$ref` ('#/a/b') names; KeyError if there is none."""
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def refs(node: Any) -> Iterator[str]:
    """Every `$ref` value under `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


class TestDocument:
    """The document itself: valid OpenAPI 3.0, and saying what the issue asks of it."""

    def test_the_document_is_valid_openapi_3_0(self) -> None:
        """The document passes the OpenAPI 3.0 meta-schema, and schemathesis's loader finds no error."""
        # Given the document as YAML
        document = raw_document()

        # When it is validated against the meta-schema, and loaded as schemathesis loads it
        OPENAPI_30_VALIDATOR.validate(document)
        schema = schemathesis.openapi.from_path(str(OPENAPI))

        # Then neither finds an error
        schema.validate()
        assert document["openapi"].startswith("3.0.")

    def test_every_reference_resolves(self) -> None:
        """Every $ref names a node that exists in the document."""
        document = raw_document()

        for ref in refs(document):
            assert ref.startswith("#/"), ref
            resolve(document, ref)

    def test_every_operation_has_a_unique_operation_id(self) -> None:
        """Each operation has an operationId, and no two share one."""
        ids = [operation.get("operationId") for _, _, operation in operations(raw_document())]

        assert None not in ids
        assert len(ids) == len(set(ids)), ids

    def test_every_operation_lists_405_with_an_allow_header(self) -> None:
        """Each operation documents the 405 of a method its path does not serve, Allow header included."""
        document = raw_document()

        for path, method, operation in operations(document):
            response = operation["responses"].get("405")
            assert response is not None, f"{method.upper()} {path}"
            if "$ref" in response:
                response = resolve(document, response["$ref"])
            assert "Allow" in response["headers"], f"{method.upper()} {path}"

    def test_timestamps_are_typed_as_date_times_or_epoch_numbers(self) -> None:
        """A record's received_at and delivered_at are date-time strings; a dead letter's times are numbers."""
        schemas = raw_document()["components"]["schemas"]

        for name in ("received_at", "delivered_at"):
            assert schemas["Record"]["properties"][name] == {
                **schemas["Record"]["properties"][name],
                "type": "string",
                "format": "date-time",
            }
        for name in ("received_at", "failed_at"):
            assert schemas["DeadLetter"]["properties"][name]["type"] == "number"

    def test_the_429_says_which_answers_stored_the_entry(self) -> None:
        """The 429 says a durable queue_full is stored (do not resend) and reject or rate limit stored nothing."""
        document = raw_document()
        text = " ".join(document["paths"]["/inbound/{source}"]["post"]["responses"]["429"]["description"].split())

        assert "stored, do not resend" in text
        assert text.count("nothing was stored") == 2
        for code in ("queue_full", "rate_limit_exceeded", "details.durable true", "details.durable false"):
            assert code in text


# -- a client built from the document, against a real gunicorn ------------------------


class DocumentClient:
    """Requests built from docs/openapi.yaml by operationId, sent to one gunicorn, answers checked."""

    def __init__(self, server: Gunicorn) -> None:
        self.server = server
        self.schema: OpenApiSchema = schemathesis.openapi.from_path(str(OPENAPI))
        self.document = raw_document()
        self.base_url = f"http://{HOST}:{server.port}"
        self.called: set[str] = set()

    def authorization(self, operation_id: str, scheme_index: int = 0) -> dict[str, str]:
        """The Authorization header of the operation's security scheme (`scheme_index`-th of its list)."""
        operation = self.schema.find_operation_by_id(operation_id)
        requirements = operation.definition.raw.get("security", [])
        if not requirements:
            return {}
        (name,) = requirements[scheme_index]
        scheme = self.document["components"]["securitySchemes"][name]
        token = TOKEN if operation_id in SOURCE_OPERATIONS else ADMIN_TOKEN
        assert scheme["type"] == "http", scheme
        if scheme["scheme"] == "bearer":
            return {"Authorization": f"Bearer {token}"}
        assert scheme["scheme"] == "basic", scheme
        return {"Authorization": "Basic " + base64.b64encode(f"any-user:{token}".encode()).decode()}

    def call(self, operation_id: str, *, scheme_index: int = 0, method: HttpMethod | None = None, **case: Any) -> Any:
        """Send the operation built from `case`'s values; the answer once it matches the document."""
        operation = self.schema.find_operation_by_id(operation_id)
        headers = {**self.authorization(operation_id, scheme_index), **case.pop("headers", {})}
        built = operation.Case(method=method, headers=headers, **case)
        response = built.call(base_url=self.base_url, timeout=10)
        built.validate_response(response, checks=CHECKS)
        self.called.add(operation_id)
        return response


@pytest.fixture
def ndjson_bodies() -> Iterator[None]:
    """Teach schemathesis the document's NDJSON media types (a string body, sent as its UTF-8), for this test only."""

    def as_utf8(context: Any, value: Any) -> bytes:
        assert isinstance(value, str), value
        return value.encode()

    schemathesis.serializer(*NDJSON_TYPES)(as_utf8)
    yield
    for transport in (ASGI_TRANSPORT, REQUESTS_TRANSPORT, WSGI_TRANSPORT):
        transport.unregister_serializer(*NDJSON_TYPES)


@pytest.fixture
def client(launch: Launcher, ndjson_bodies: None) -> DocumentClient:
    server = ready(launch(workers=1, env=DEAD_LETTER_ENV))
    return DocumentClient(server)


@pytest.mark.process
class TestClientFromTheDocument:
    """Every operation, called by its operationId as the document describes it, answers as documented."""

    def test_every_operation_answers_as_documented(self, client: DocumentClient) -> None:
        """Writes (one, array, NDJSON, Bearer, Basic, keyed), query, probes, metrics, status, dead letters."""
        source = {"source": "default"}
        # Given a gunicorn, and a client that knows only the document
        # When entries are written every way the document offers
        one = client.call("writeEntries", path_parameters=source, body={"n": 1}, media_type="application/json")
        basic = client.call(
            "writeEntries", scheme_index=1, path_parameters=source, body={"n": 2}, media_type="application/json"
        )
        array = client.call(
            "writeEntries", path_parameters=source, body=[{"n": 3}, {"n": 4}], media_type="application/json"
        )
        ndjson = client.call(
            "writeEntries",
            path_parameters=source,
            body='{"n": 5}\n{"n": 6}\n',
            media_type="application/x-ndjson",
        )
        keyed = [
            client.call(
                "writeEntries",
                path_parameters=source,
                headers={"Idempotency-Key": "openapi-key-1"},
                body={"n": 7},
                media_type="application/json",
            )
            for _ in range(2)
        ]
        # Then each is answered as documented: 202 with its id(s), and the resend of a key 200
        assert [r.status_code for r in (one, basic, array, ndjson)] == [202] * 4
        assert len(array.json()["payload_ids"]) == 2
        assert len(ndjson.json()["payload_ids"]) == 2
        assert [r.status_code for r in keyed] == [202, 200]
        ids = [one.json()["payload_id"], basic.json()["payload_id"], *array.json()["payload_ids"]]
        ids += [*ndjson.json()["payload_ids"], keyed[0].json()["payload_id"]]

        # When they are delivered and read back
        wait_delivered(client.server.db_path, ids, timeout=30)
        page = client.call("queryEntries", path_parameters={"destination": "default"}, query={"limit": 50})
        # Then the page holds them, with ISO-8601 date-times as documented
        records = page.json()["records"]
        assert {r["payload_id"] for r in records} == set(ids)
        for record in records:
            datetime.fromisoformat(record["received_at"])
            datetime.fromisoformat(record["delivered_at"])

        # When the probes, metrics and status are read
        for operation_id in ("getHealth", "getReady", "getMetrics", "getStatus"):
            assert client.call(operation_id).status_code == 200, operation_id

        # When an entry the destination refuses becomes a dead letter, and is listed and retried
        with poisoned(client.server.db_path, POISON):
            poison = client.call(
                "writeEntries", path_parameters=source, body={"tag": POISON}, media_type="application/json"
            )
            poison_id = poison.json()["payload_id"]
            letters: list[dict[str, Any]] = wait_for(
                lambda: client.call("listDeadLetters", query={"limit": 10}).json()["dead_letters"],
                15,
                "a dead letter",
                describe=client.server.log_tail,
            )
        assert [letter["payload_id"] for letter in letters] == [poison_id]
        retry = client.call("retryDeadLetter", path_parameters={"payload_id": poison_id})
        # Then each answer matched its documented schema, and the retry is delivered
        assert retry.status_code == 202
        wait_delivered(client.server.db_path, [poison_id], timeout=30)

        # When OpenTelemetry logs are exported as the document describes (OTLP/JSON)
        export = client.call("exportLogs", body=OTLP_EXPORT, media_type="application/json")
        # Then the answer is an empty ExportLogsServiceResponse: every record stored
        assert export.status_code == 200
        assert export.json() == {}
        every = {operation["operationId"] for _, _, operation in operations(client.document)}
        assert client.called == every

    def test_a_method_a_path_does_not_serve_gets_the_documented_405(self, client: DocumentClient) -> None:
        """For every path, a method it does not serve is answered 405 as its operations document it."""
        for path, method, operation in operations(client.document):
            # Given a method no operation of this path serves
            served = {m for m in METHODS if m in client.document["paths"][path]}
            other: HttpMethod = next(m for m in ("DELETE", "PUT", "PATCH") if m.lower() not in served)
            parameters = {"source": "default", "destination": "default", "payload_id": "0" * 32}
            wanted = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}

            # When it is sent to the path
            response = client.call(
                operation["operationId"],
                method=other,
                path_parameters={k: v for k, v in parameters.items() if k in wanted},
            )

            # Then the answer is the documented 405, naming the methods the path serves
            assert response.status_code == 405, (method, path)
            assert response.json()["error"] == "method_not_allowed"
            allowed = {m.strip().lower() for m in response.headers["allow"][0].split(",")}
            assert served <= allowed, (path, allowed)
