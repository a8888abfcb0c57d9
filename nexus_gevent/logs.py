"""Logging: one JSON object per line on stdout, for our own logs, libraries' and gunicorn's.

Request bodies and tokens must never be logged. The redaction processor is a
safety net for mistakes, not a licence: it replaces the values of keys such as
``token``, ``body`` or ``authorization`` and the credential of any
"Bearer <token>" text, but it cannot recognise a secret under an innocent key.

Our own loggers take structlog's fast path (orjson straight into stdout's byte
buffer, no stdlib logging). Stdlib loggers (libraries, gunicorn) are rendered by
``structlog.stdlib.ProcessorFormatter`` with the same processors, so both kinds
of line have the same shape.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol, TextIO, cast

import orjson
import structlog
from gunicorn.glogging import Logger as _GunicornBaseLogger
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from .errors import ConfigError


class Logger(Protocol):
    """What the service asks of a logger: structlog's bound logger, or testing.RecordingLogger."""

    def bind(self, **fields: Any) -> Logger: ...

    def debug(self, event: str, **fields: Any) -> Any: ...

    def info(self, event: str, **fields: Any) -> Any: ...

    def warning(self, event: str, **fields: Any) -> Any: ...

    def error(self, event: str, **fields: Any) -> Any: ...

    def exception(self, event: str, **fields: Any) -> Any: ...


REDACTED = "[redacted]"

#: Keys whose values are replaced by REDACTED, compared case-insensitively
#: ("-" counts as "_", so header-style names match too).
SENSITIVE_KEYS = frozenset({"authorization", "token", "admin_token", "password", "body", "payload", "secret"})

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# The scheme is case-insensitive (RFC 7235); the credential runs to the next
# space or quote, which also covers a header embedded in a repr().
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"']+")
_BEARER_REPLACEMENT = r"\1 " + REDACTED

# Nested containers are copied, not edited, so the caller's objects stay intact;
# the depth bound keeps a self-referencing structure from recursing forever.
_MAX_DEPTH = 4

# Log lines use a handful of distinct keys, so caching the verdict per key keeps
# the case-folding off the per-line cost. Bounded so odd keys cannot grow it.
_key_verdicts: dict[str, bool] = {}
_KEY_CACHE_LIMIT = 4096
_SEQUENCES = (list, tuple)
_CONTAINERS = (dict, list, tuple)


def parse_level(name: str) -> int:
    """The logging level for a name such as "info" or "WARNING"; ConfigError if unknown."""
    level = _LEVELS.get(name.strip().lower())
    if level is None:
        choices = ", ".join(sorted(_LEVELS))
        raise ConfigError(f"NEXUS_LOG_LEVEL: unknown log level {name!r} (one of: {choices})")
    return level


def _is_sensitive(key: str) -> bool:
    verdict = _key_verdicts.get(key)
    if verdict is None:
        verdict = key.lower().replace("-", "_") in SENSITIVE_KEYS
        if len(_key_verdicts) < _KEY_CACHE_LIMIT:
            _key_verdicts[key] = verdict
    return verdict


def _redact_text(value: str) -> str:
    # The substring test is far cheaper than the regex and almost always false.
    if "bearer" in value.lower():
        return _BEARER.sub(_BEARER_REPLACEMENT, value)
    return value


def _redact_value(value: object, depth: int) -> object:
    if isinstance(value, str):
        return _redact_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and _is_sensitive(k) else _redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, _SEQUENCES):
        return [_redact_value(v, depth + 1) for v in value]
    return value


def redact(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Processor: hide the values of SENSITIVE_KEYS and the credential of "Bearer ..." text."""
    # It runs on every line, so the common case (a known, harmless key with a
    # short string or a number) is kept to a dict lookup and a type check.
    # The event dict is structlog's own copy, so editing it in place is safe;
    # assigning to existing keys does not disturb the iteration.
    for key, value in event_dict.items():
        sensitive = _key_verdicts.get(key)
        if sensitive is None:
            sensitive = _is_sensitive(key)
        if sensitive:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = _redact_text(value)
        elif isinstance(value, _CONTAINERS):
            event_dict[key] = _redact_value(value, 0)
    return event_dict


def _orjson_text(obj: Any, **kwargs: Any) -> str:
    # logging.Formatter and text streams need str; the bytes path skips this decode.
    return orjson.dumps(obj, **kwargs).decode("utf-8")


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        # A closed stream, or a file-like object without isatty().
        return False


def _timestamper() -> Processor:
    return structlog.processors.TimeStamper(fmt="iso", utc=True)


def _json_renderer(*, as_bytes: bool) -> Processor:
    # Non-str keys would make orjson raise, which would lose the whole line.
    serializer: Callable[..., str | bytes] = orjson.dumps if as_bytes else _orjson_text
    return structlog.processors.JSONRenderer(serializer=serializer, option=orjson.OPT_NON_STR_KEYS)


def make_stdlib_formatter(*, json: bool, colors: bool = False) -> logging.Formatter:
    """A logging.Formatter that renders stdlib records exactly like our structlog lines."""
    renderer: Processor = _json_renderer(as_bytes=False) if json else structlog.dev.ConsoleRenderer(colors=colors)
    pre_chain: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        _timestamper(),
    ]
    if json:
        # The console renderer formats exc_info itself, and better.
        pre_chain.append(structlog.processors.format_exc_info)
    pre_chain.append(redact)
    return structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=pre_chain,
    )


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    # BytesLogger and _NamedWriteLogger carry the name given to get_logger().
    name = getattr(logger, "name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """A WriteLogger that knows its name, like BytesLogger does."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


def _text_logger_factory(file: TextIO) -> Callable[..., WrappedLogger]:
    def factory(*args: Any) -> WrappedLogger:
        return _NamedWriteLogger(file, args[0] if args else None)

    return factory


class _RootHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure_logging installs on the root logger (found again by type)."""


def configure_logging(level: str = "INFO", *, json: bool | None = None, stream: IO[str] | None = None) -> None:
    """Configure structlog and the stdlib root logger to write to `stream` (default stdout).

    json=None means JSON unless the stream is a terminal, where a human-readable
    console rendering is used. Calling it again replaces the previous setup.
    """
    numeric_level = parse_level(level)
    out = stream if stream is not None else sys.stdout
    tty = _isatty(out)
    as_json = not tty if json is None else json

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        _timestamper(),
    ]
    logger_factory: Callable[..., WrappedLogger]
    if as_json:
        # Redaction runs after format_exc_info so that a formatted traceback is
        # scanned for credentials too.
        processors += [structlog.processors.format_exc_info, redact]
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            # Anything still in the text layer must come out before our bytes do.
            out.flush()
            processors.append(_json_renderer(as_bytes=True))
            logger_factory = structlog.BytesLoggerFactory(file=buffer)
        else:
            processors.append(_json_renderer(as_bytes=False))
            logger_factory = _text_logger_factory(cast(TextIO, out))
    else:
        processors += [redact, structlog.dev.ConsoleRenderer(colors=tty)]
        logger_factory = _text_logger_factory(cast(TextIO, out))

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=logger_factory,
        context_class=dict,
        # Not cached: module-level loggers created before this call (or before a
        # reconfiguration) must pick up the current setup.
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RootHandler)]:
        root.removeHandler(old)
    handler = _RootHandler(out)
    handler.setFormatter(make_stdlib_formatter(json=as_json, colors=tty))
    root.addHandler(handler)
    root.setLevel(numeric_level)


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; `name`, if given, appears as the line's "logger" field."""
    # The name travels as a logger-factory argument ("logger" cannot be an
    # initial value: it collides with wrap_logger's own parameter).
    logger: FilteringBoundLogger = structlog.get_logger(name) if name is not None else structlog.get_logger()
    return logger


class GunicornLogger(_GunicornBaseLogger):  # type: ignore[misc]
    """gunicorn's logger class, rendering its lines like ours.

    Use with ``logger_class = "nexus_gevent.logs.GunicornLogger"``. gunicorn's
    error log, when it goes to "-", moves from stderr to stdout so that the
    service has one stream of JSON lines. The access log stays off unless
    configured (gunicorn's default): the app logs one line per request itself,
    and gunicorn's access line would duplicate it.
    """

    def setup(self, cfg: Any) -> None:
        """Let gunicorn build its handlers (levels, files, reload), then swap their formatters."""
        super().setup(cfg)
        loggers: Sequence[logging.Logger] = (self.error_log, self.access_log)
        for log in loggers:
            for handler in log.handlers:
                # Only gunicorn's own stream/file handlers: syslog keeps its
                # format, and handlers from a logconfig are the operator's.
                if not getattr(handler, "_gunicorn", False):
                    continue
                if not isinstance(handler, logging.StreamHandler):
                    continue
                if log is self.error_log and cfg.errorlog == "-" and not isinstance(handler, logging.FileHandler):
                    handler.setStream(sys.stdout)
                tty = _isatty(handler.stream)
                handler.setFormatter(make_stdlib_formatter(json=not tty, colors=tty))
