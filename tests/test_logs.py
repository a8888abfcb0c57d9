"""Logging: JSON lines, redaction, stdlib and gunicorn routing, level filtering."""

# The tokens here are test fixtures, not credentials.

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import falcon
import falcon.testing
import pytest
import structlog
from gunicorn.config import Config

from nexus_gevent.errors import ConfigError
from nexus_gevent.http.middleware import RequestContext
from nexus_gevent.logs import (
    REDACTED,
    GunicornLogger,
    configure_logging,
    get_logger,
    parse_level,
)

# configure_logging changes process-wide state: conftest's fixture puts it back after each test.
pytestmark = pytest.mark.usefixtures("restore_logging")


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _configured(level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, json=True, stream=stream)
    return stream


class TestJsonLines:
    def test_line_is_json_with_level_timestamp_and_event(self) -> None:
        """Each log call writes one JSON object carrying level, a UTC ISO timestamp and the event."""
        stream = _configured()

        get_logger().info("request_done", status=202)

        [line] = _lines(stream)
        assert line["event"] == "request_done"
        assert line["level"] == "info"
        assert line["status"] == 202
        assert line["timestamp"].endswith("Z")
        assert datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).tzinfo is not None

    def test_logger_name_is_included(self) -> None:
        """get_logger(name) tags its lines with "logger": name."""
        stream = _configured()

        get_logger("nexus_gevent.wal").warning("segment_rotated")

        assert _lines(stream)[0]["logger"] == "nexus_gevent.wal"

    def test_context_variables_are_merged(self) -> None:
        """Values bound with structlog.contextvars (the request id) appear on every line."""
        stream = _configured()
        structlog.contextvars.bind_contextvars(request_id="r-1")

        get_logger().info("one")
        logging.getLogger("somelib").info("two")

        assert [line["request_id"] for line in _lines(stream)] == ["r-1", "r-1"]

    def test_exception_is_rendered_as_a_string_field(self) -> None:
        """log.exception() puts the formatted traceback in the "exception" field."""
        stream = _configured()

        try:
            raise ValueError("boom")
        except ValueError:
            get_logger().exception("delivery_crashed")

        [line] = _lines(stream)
        assert line["level"] == "error"
        assert "ValueError: boom" in line["exception"]

    def test_unserialisable_values_do_not_lose_the_line(self) -> None:
        """Objects JSON cannot encode, and non-string keys, are rendered rather than dropped."""
        stream = _configured()

        get_logger().info("odd", path=Path("/x"), counts={1: "a"})

        [line] = _lines(stream)
        assert line["path"] == repr(Path("/x"))
        assert line["counts"] == {"1": "a"}

    def test_real_file_gets_bytes_and_stdlib_lines_in_order(self, tmp_path: Path) -> None:
        """On a file with a byte buffer (as stdout is), both kinds of line land whole and in order."""
        path = tmp_path / "out.log"
        with path.open("w") as stream:
            configure_logging("INFO", json=True, stream=stream)
            get_logger().info("first")
            logging.getLogger("lib").info("second")
            get_logger().info("third")

        lines = [json.loads(text) for text in path.read_text().splitlines()]
        assert [line["event"] for line in lines] == ["first", "second", "third"]

    def test_json_is_chosen_for_a_stream_that_is_not_a_terminal(self) -> None:
        """json=None renders JSON when the stream is not a TTY (production: a pipe)."""
        stream = io.StringIO()
        configure_logging("INFO", stream=stream)

        get_logger().info("hello")

        assert _lines(stream)[0]["event"] == "hello"

    def test_console_rendering_when_json_is_off(self) -> None:
        """json=False renders human-readable lines, still redacted."""
        stream = io.StringIO()
        configure_logging("INFO", json=False, stream=stream)

        get_logger().info("hello", token="abc")

        text = stream.getvalue()
        assert "hello" in text
        assert "abc" not in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

    def test_reconfiguring_does_not_duplicate_stdlib_lines(self) -> None:
        """Calling configure_logging twice leaves one root handler: each stdlib record once."""
        configure_logging("INFO", json=True, stream=io.StringIO())
        stream = _configured()

        logging.getLogger("lib").info("once")

        assert len(_lines(stream)) == 1


class TestRedaction:
    @pytest.mark.parametrize("key", ["token", "admin_token", "password", "body", "payload", "secret", "authorization"])
    def test_sensitive_keys_are_redacted(self, key: str) -> None:
        """Values under a sensitive key never reach the output."""
        stream = _configured()

        get_logger().info("event", **{key: "s3cr3t-value"})

        assert _lines(stream)[0][key] == REDACTED
        assert "s3cr3t-value" not in stream.getvalue()

    def test_key_match_ignores_case_and_dashes(self) -> None:
        """Authorization, TOKEN and Admin-Token are redacted like their lower-case forms."""
        stream = _configured()

        get_logger().info("event", Authorization="a", TOKEN="b", **{"Admin-Token": "c"})

        [line] = _lines(stream)
        assert (line["Authorization"], line["TOKEN"], line["Admin-Token"]) == (REDACTED,) * 3

    def test_bearer_credentials_in_text_are_redacted(self) -> None:
        """Any "Bearer <token>" text keeps the scheme but loses the credential."""
        stream = _configured()

        get_logger().info("auth header was Bearer abc.DEF-123", header="bearer xyz789")

        [line] = _lines(stream)
        assert line["event"] == f"auth header was Bearer {REDACTED}"
        assert line["header"] == f"bearer {REDACTED}"

    def test_nested_values_are_redacted_without_touching_the_callers_objects(self) -> None:
        """Sensitive keys and Bearer text inside dicts and lists are hidden; the originals stay intact."""
        stream = _configured()
        headers = {"Authorization": "Bearer abc", "Accept": "application/json"}
        notes = ["see Bearer def"]

        get_logger().info("request", headers=headers, notes=notes)

        [line] = _lines(stream)
        assert line["headers"] == {"Authorization": REDACTED, "Accept": "application/json"}
        assert line["notes"] == [f"see Bearer {REDACTED}"]
        assert headers["Authorization"] == "Bearer abc"
        assert notes == ["see Bearer def"]

    def test_similar_but_harmless_keys_are_kept(self) -> None:
        """payload_id, token_file and the like are logged: only exact sensitive names are hidden."""
        stream = _configured()

        get_logger().info("event", payload_id="ab12", token_file="/var/secrets/token-default")

        [line] = _lines(stream)
        assert line["payload_id"] == "ab12"
        assert line["token_file"] == "/var/secrets/token-default"

    def test_stdlib_messages_are_redacted_too(self) -> None:
        """A library logging a Bearer header through stdlib logging is redacted as well."""
        stream = _configured()

        logging.getLogger("httplib").warning("sent %s", "Authorization: Bearer abc123")

        assert _lines(stream)[0]["event"] == f"sent Authorization: Bearer {REDACTED}"

    def test_traceback_text_is_scanned_too(self) -> None:
        """A credential quoted in an exception message does not leak through the traceback."""
        stream = _configured()

        try:
            raise RuntimeError("upstream refused Bearer abc123")
        except RuntimeError:
            get_logger().exception("failed")

        assert "abc123" not in stream.getvalue()


class TestStdlibRouting:
    def test_stdlib_records_use_the_same_json_shape(self) -> None:
        """A third-party library's stdlib log line is JSON with the same fields as ours."""
        stream = _configured()

        logging.getLogger("psycopg.pool").warning("pool %s exhausted", "main")

        [line] = _lines(stream)
        assert line["event"] == "pool main exhausted"
        assert line["level"] == "warning"
        assert line["logger"] == "psycopg.pool"
        assert line["timestamp"].endswith("Z")

    def test_stdlib_exceptions_are_rendered(self) -> None:
        """logger.exception() from stdlib code carries the traceback in "exception"."""
        stream = _configured()

        try:
            raise KeyError("k")
        except KeyError:
            logging.getLogger("lib").exception("lookup failed")

        assert "KeyError: 'k'" in _lines(stream)[0]["exception"]


class TestLevels:
    def test_debug_is_dropped_at_info(self) -> None:
        """At INFO, debug lines from structlog and stdlib loggers are not written."""
        stream = _configured("INFO")

        get_logger().debug("noise")
        logging.getLogger("lib").debug("noise")
        get_logger().info("signal")

        assert [line["event"] for line in _lines(stream)] == ["signal"]

    def test_debug_is_written_at_debug(self) -> None:
        """At DEBUG, debug lines are written."""
        stream = _configured("DEBUG")

        get_logger().debug("detail")
        logging.getLogger("lib").debug("detail")

        assert [line["level"] for line in _lines(stream)] == ["debug", "debug"]

    def test_warning_level_drops_info(self) -> None:
        """At WARNING, info is dropped and errors pass."""
        stream = _configured("warning")

        get_logger().info("dropped")
        get_logger().error("kept")

        assert [line["event"] for line in _lines(stream)] == ["kept"]

    @pytest.mark.parametrize(
        ("name", "level"),
        [("debug", logging.DEBUG), ("INFO", logging.INFO), ("Warn", logging.WARNING)],
    )
    def test_level_names_are_case_insensitive(self, name: str, level: int) -> None:
        """parse_level accepts level names in any case, and "warn" for WARNING."""
        assert parse_level(name) == level

    def test_unknown_level_is_a_config_error(self) -> None:
        """An unknown level name raises ConfigError naming NEXUS_LOG_LEVEL."""
        with pytest.raises(ConfigError, match="NEXUS_LOG_LEVEL"):
            configure_logging("chatty", stream=io.StringIO())


class TestGunicornLogger:
    @pytest.fixture(autouse=True)
    def _restore_gunicorn_loggers(self) -> Iterator[None]:
        """GunicornLogger installs handlers on gunicorn's global loggers; remove them after."""
        yield
        for name in ("gunicorn.error", "gunicorn.access"):
            logging.getLogger(name).handlers.clear()

    def test_error_log_goes_to_stdout_as_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        """gunicorn's error log ("-") becomes JSON lines on stdout instead of text on stderr."""
        cfg = Config()
        cfg.set("errorlog", "-")

        GunicornLogger(cfg).info("Booting worker with pid: %s", 4242)

        out, err = capsys.readouterr()
        [line] = [json.loads(text) for text in out.splitlines()]
        assert line["event"] == "Booting worker with pid: 4242"
        assert line["level"] == "info"
        assert line["logger"] == "gunicorn.error"
        assert err == ""

    def test_error_log_file_gets_json(self, tmp_path: Path) -> None:
        """An --error-logfile path keeps receiving gunicorn's lines, now as JSON."""
        path = tmp_path / "error.log"
        cfg = Config()
        cfg.set("errorlog", str(path))

        GunicornLogger(cfg).warning("Worker with pid %s was terminated", 7)
        for handler in logging.getLogger("gunicorn.error").handlers:
            handler.flush()

        [line] = [json.loads(text) for text in path.read_text().splitlines()]
        assert line["event"] == "Worker with pid 7 was terminated"

    def test_access_log_is_off_by_default(self) -> None:
        """With gunicorn's defaults no access line is produced: the app logs requests itself."""
        logger = GunicornLogger(Config())

        assert not logger.access_log_enabled


class TestRequestContext:
    """The request middleware: every request starts with a log context of its own."""

    def test_a_value_bound_during_one_request_is_gone_in_the_next(self) -> None:
        """A key a handler binds with structlog.contextvars does not reach the next request's lines (keep-alive)."""
        stream = _configured()
        app = falcon.App(middleware=[RequestContext(get_logger())])
        app.add_route("/bind", _Binding())
        client = falcon.testing.TestClient(app)

        # Given one request that binds a key of its own (same greenlet, as on a keep-alive connection)
        client.simulate_post("/bind")
        # When the next request is served
        client.simulate_get("/bind", headers={"X-Request-Id": "second"})

        # Then its lines carry its own request id and none of the earlier request's keys
        second = [line for line in _lines(stream) if line.get("request_id") == "second"]
        assert [line["event"] for line in second] == ["handled", "request"]
        assert all("tenant" not in line for line in second)


class _Binding:
    """Binds a key of its own on POST; logs one line on every request."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        structlog.contextvars.bind_contextvars(tenant="first")
        get_logger().info("handled")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        get_logger().info("handled")
