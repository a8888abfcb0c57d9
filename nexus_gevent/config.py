"""Settings: environment variables over an optional TOML file over built-in defaults.

The TOML file (``NEXUS_CONFIG``) looks like this::

    # Top-level keys are the NEXUS_* variable names, lowercase, without the prefix.
    data_dir = "/srv/nexus"
    queue_size = 20000
    admin_token = "file:/run/secrets/nexus-admin"

    [[destinations]]
    name = "warehouse"
    url = "postgresql://nexus@db/nexus"

    [[sources]]
    name = "billing"
    token = "env:BILLING_TOKEN"    # a literal, env:VAR, or file:PATH
    destination = "warehouse"      # optional; "default" if left out
    rate_limit_per_second = 50     # optional; unlimited if left out
    rate_limit_burst = 200         # optional; max(1, ceil(rate)) if left out
    idempotency_key_field = "id"   # optional; an entry's string "id" is its idempotency key
    otlp_subject_attribute = "host.name"  # optional; "service.name" if left out (POST /v1/logs)

Rules:

- An environment variable wins over the TOML key of the same setting. A variable
  set to the empty string counts as unset (compose files often pass ``FOO=``).
- Relative paths (``data_dir``, ``file:``) are relative to the working directory.
- Without ``[[sources]]`` there is one source, ``default``. Its token is
  ``NEXUS_TOKEN`` (or the top-level ``token``); its destination is ``default``,
  whose URL is ``NEXUS_DESTINATION_URL`` (or the top-level ``destination_url``),
  else ``sqlite:///{data_dir}/nexus.db``. The ``default`` destination exists
  whenever a source uses it or the file declares it.
- A source without a token, and the admin token when none is given, get a
  generated one, kept in ``{data_dir}/secrets/token-<name>`` and
  ``{data_dir}/secrets/admin-token`` (mode 0600) and reused on the next start.
- Tokens must be visible ASCII (no spaces) and distinct from one another, so
  that a token names exactly one source, or the admin.
- A source's rate limit (entries a second, and the burst: a token bucket, see
  ``rate_limit``) is ``rate_limit_per_second`` / ``rate_limit_burst`` in its
  ``[[sources]]`` table; the ``default`` source's is ``NEXUS_RATE_LIMIT_PER_SECOND`` /
  ``NEXUS_RATE_LIMIT_BURST`` (or the top-level keys, without ``[[sources]]``). No rate
  means no limit; a rate without a burst has a burst of ``max(1, ceil(rate))``.
- A source's ``idempotency_key_field`` (in its ``[[sources]]`` table; the ``default``
  source's is ``NEXUS_IDEMPOTENCY_KEY_FIELD``, or the top-level key without
  ``[[sources]]``) names a top-level field of each entry whose string value is that
  entry's idempotency key.
- A source's ``otlp_subject_attribute`` (the same way; ``NEXUS_OTLP_SUBJECT_ATTRIBUTE``
  for ``default``) names the OpenTelemetry attribute whose value is the subject of
  each log record it sends to ``/v1/logs``; ``service.name`` when not set.

This module holds the schema and these rules; the lookup itself (environment over
file over default) is ``_layers.Layers``, and token references and secret files
are ``secrets``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from . import datadir
from ._layers import Layers, parse_integer, parse_positive, parse_seconds
from .errors import ConfigError
from .logs import parse_level
from .queue import DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_ATTEMPTS, or_default
from .queue import DEFAULT_SIZE as DEFAULT_QUEUE_SIZE
from .secrets import check_token, ensure_private_dir, resolve_token, stored_token
from .wal import DEFAULT_SEGMENT_BYTES

#: The service's default, above the spec's 1: four delivery greenlets overlap
#: destination round trips without crowding SQLite's single writer.
DEFAULT_QUEUE_WORKERS = 4
#: Seconds a delivery greenlet waits for more entries before it writes a batch. At a
#: steady load of single-entry writes, delivery otherwise commits every few entries,
#: and a commit costs SQLite a page write per index and an fsync: with 50 ms, 6-10 %
#: more writes/s at saturation (docs/performance.md, "Fourth round"). It delays only
#: when an entry becomes visible in the destination, never an acknowledgement.
DEFAULT_DELIVERY_LINGER = 0.05
#: Longer would leave entries out of /query for longer than any reader expects.
MAX_DELIVERY_LINGER = 10.0
#: Fits inside gunicorn's graceful_timeout (ends in SIGKILL) and heartbeat
#: timeout (ends in SIGABRT), both 30 s by default, leaving 10 s to close the
#: WAL and pools (gunicorn.conf.py keeps both at this plus 10 s).
DEFAULT_DRAIN_TIMEOUT = 20.0
#: Contract default: the largest request body accepted.
DEFAULT_MAX_BODY_BYTES = 1_048_576
#: Contract default: the most entries one batch (a JSON array, or NDJSON lines) may hold.
DEFAULT_MAX_BATCH_ENTRIES = 1000
#: A day: longer than any client's retry loop is expected to last.
DEFAULT_IDEMPOTENCY_WINDOW = 86_400.0
#: Long enough for a client's retries after a 429 (urllib3, got and syslog-ng retry within
#: seconds to a minute), short enough that an identical later entry is not taken for one.
DEFAULT_SHED_RESEND_WINDOW = 60.0
#: Where an OTLP log record's subject comes from unless its source says otherwise: OpenTelemetry's
#: name of the service that emitted it (a resource attribute in the semantic conventions).
DEFAULT_SUBJECT_ATTRIBUTE = "service.name"
#: The longest idempotency_key_field: a JSON field name, kept as short as a key.
MAX_KEY_FIELD_LENGTH = 255
#: Seconds a request body may take to arrive: a client that stops sending must not hold
#: its connection (and a share of the worker) for ever; 30 s is generous for 1 MiB.
DEFAULT_BODY_TIMEOUT = 30.0
#: A /query page holds at most this many payload bytes (and at least one record).
DEFAULT_QUERY_PAGE_BYTES = 16 * 1024 * 1024

DEFAULT_NAME = "default"
ADMIN_TOKEN_FILENAME = "admin-token"  # noqa: S105 -- a file name, not a secret

ShedPolicy = Literal["durable", "reject"]

# Names appear in URL paths and in secret file names, hence the narrow alphabet.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# The keys a TOML file may hold at its top level.
_TOP_LEVEL_KEYS = frozenset(
    {
        "sources",
        "destinations",
        "data_dir",
        "destination_url",
        "token",
        "admin_token",
        "queue_size",
        "queue_workers",
        "delivery_linger",
        "max_attempts",
        "initial_backoff",
        "drain_timeout",
        "max_body_bytes",
        "max_batch_entries",
        "shed_policy",
        "log_level",
        "metrics_public",
        "idempotency_window",
        "body_timeout",
        "query_page_bytes",
        "wal_segment_bytes",
        "rate_limit_per_second",
        "rate_limit_burst",
        "idempotency_key_field",
        "shed_resend_window",
        "otlp_subject_attribute",
    }
)
_RATE_KEY = "rate_limit_per_second"
_BURST_KEY = "rate_limit_burst"
_KEY_FIELD = "idempotency_key_field"
_SUBJECT_ATTRIBUTE = "otlp_subject_attribute"
_SOURCE_KEYS = frozenset(
    {"name", "token", "destination", "can_read", _RATE_KEY, _BURST_KEY, _KEY_FIELD, _SUBJECT_ATTRIBUTE}
)
_DESTINATION_KEYS = frozenset({"name", "url"})


@dataclass(frozen=True, slots=True, repr=False)
class DestinationSettings:
    """Where delivered entries are stored: ``sqlite:///PATH`` or ``postgresql://...``."""

    name: str
    url: str

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced, fit for logs and error messages."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    def __repr__(self) -> str:
        return f"DestinationSettings(name={self.name!r}, url={self.redacted_url!r})"


@dataclass(frozen=True, slots=True)
class SourceSettings:
    """A client that writes to /inbound/{name} with its bearer token."""

    name: str
    token: str = field(repr=False)
    destination: str
    #: Entries a second this source may write, over every worker of the instance; None: unlimited.
    rate_limit_per_second: float | None = None
    #: The token bucket's size: entries written at once after a quiet spell. Set whenever the rate is.
    rate_limit_burst: int | None = None
    #: Other sources whose records this source's token may read through /query.
    can_read: tuple[str, ...] = ()
    #: A top-level field of each entry whose string value is that entry's idempotency key; None: none.
    idempotency_key_field: str | None = None
    #: The attribute (the record's, else its resource's) whose string value is the subject of an OTLP log record.
    otlp_subject_attribute: str = DEFAULT_SUBJECT_ATTRIBUTE

    @property
    def readable(self) -> frozenset[str]:
        """The sources whose records this source's token may read: its own, and those of can_read."""
        return frozenset((self.name, *self.can_read))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service is configured with; build it with load_settings()."""

    data_dir: Path
    sources: tuple[SourceSettings, ...]
    destinations: tuple[DestinationSettings, ...]
    admin_token: str = field(repr=False)
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_workers: int = DEFAULT_QUEUE_WORKERS
    delivery_linger: float = DEFAULT_DELIVERY_LINGER
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch_entries: int = DEFAULT_MAX_BATCH_ENTRIES
    shed_policy: ShedPolicy = "durable"
    log_level: str = "INFO"
    metrics_public: bool = False
    idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW
    #: Seconds after a durable 429 in which the same body again is a duplicate; 0 turns it off.
    shed_resend_window: float = DEFAULT_SHED_RESEND_WINDOW
    #: 0 turns the body timeout off.
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    query_page_bytes: int = DEFAULT_QUERY_PAGE_BYTES
    wal_segment_bytes: int = DEFAULT_SEGMENT_BYTES
    #: Token files this load generated or read, so the service can log where
    #: a token is kept (never the token itself).
    generated_secrets: tuple[Path, ...] = ()

    def source(self, name: str) -> SourceSettings | None:
        """The source called `name`, or None."""
        for source in self.sources:
            if source.name == name:
                return source
        return None

    def destination(self, name: str) -> DestinationSettings:
        """The destination called `name`; KeyError if there is none."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        raise KeyError(name)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from `environ` (default os.environ) and the TOML file it names.

    Raises ConfigError naming the setting at fault. May create the data dir,
    its secrets dir (both 0700) and generated token files; safe when several
    workers run it at once.
    """
    layers = Layers(
        os.environ if environ is None else environ,
        prefix="NEXUS_",
        file_variable="NEXUS_CONFIG",
        keys=_TOP_LEVEL_KEYS,
    )

    data_dir = Path(layers.text("data_dir", datadir.DEFAULT_DATA_DIR))
    declared = _declared_destinations(layers)
    sources = _sources(layers, {d.name for d in declared} | {DEFAULT_NAME})
    readers = _readers(layers, {s[0] for s in sources})
    key_fields = _per_source_names(layers, {s[0] for s in sources}, _KEY_FIELD)
    subject_attributes = _per_source_names(layers, {s[0] for s in sources}, _SUBJECT_ATTRIBUTE)
    destinations = _with_default_destination(declared, sources, layers, data_dir)
    explicit_admin = _admin_token(layers)
    _check_distinct(sources, explicit_admin)

    queue_size = layers.integer("queue_size", DEFAULT_QUEUE_SIZE)
    queue_workers = layers.integer("queue_workers", DEFAULT_QUEUE_WORKERS)
    delivery_linger = layers.read("delivery_linger", DEFAULT_DELIVERY_LINGER, _delivery_linger)
    max_attempts = layers.integer("max_attempts", DEFAULT_MAX_ATTEMPTS, minimum=1)
    initial_backoff = layers.seconds("initial_backoff", DEFAULT_INITIAL_BACKOFF)
    drain_timeout = layers.seconds("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    max_body_bytes = layers.integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1)
    max_batch_entries = layers.integer("max_batch_entries", DEFAULT_MAX_BATCH_ENTRIES, minimum=1)
    idempotency_window = layers.seconds("idempotency_window", DEFAULT_IDEMPOTENCY_WINDOW)
    shed_resend_window = layers.seconds("shed_resend_window", DEFAULT_SHED_RESEND_WINDOW)
    body_timeout = layers.seconds("body_timeout", DEFAULT_BODY_TIMEOUT)
    query_page_bytes = layers.integer("query_page_bytes", DEFAULT_QUERY_PAGE_BYTES, minimum=1)
    wal_segment_bytes = layers.integer("wal_segment_bytes", DEFAULT_SEGMENT_BYTES, minimum=1)
    shed_policy: ShedPolicy = layers.read("shed_policy", "durable", _shed_policy)
    log_level = layers.read("log_level", "INFO", _log_level)
    metrics_public = layers.flag("metrics_public", False)

    # Side effects come last, so that an invalid configuration leaves no trace.
    _make_dir(data_dir)
    touched: list[Path] = []

    def generated(filename: str) -> str:
        path = datadir.secrets_dir(data_dir) / filename
        token = stored_token(path)
        touched.append(path)
        return token

    # An explicit token is never empty (check_token refuses it), so `or` fills in only the missing ones.
    resolved = [
        SourceSettings(
            name=name,
            token=token or generated(f"token-{name}"),
            destination=destination,
            rate_limit_per_second=rate,
            rate_limit_burst=burst,
            can_read=readers.get(name, ()),
            idempotency_key_field=key_fields.get(name),
            otlp_subject_attribute=subject_attributes.get(name, DEFAULT_SUBJECT_ATTRIBUTE),
        )
        for name, token, destination, (rate, burst) in sources
    ]
    admin_token = explicit_admin or generated(ADMIN_TOKEN_FILENAME)

    return Settings(
        data_dir=data_dir,
        sources=tuple(resolved),
        destinations=tuple(destinations),
        admin_token=admin_token,
        queue_size=or_default(queue_size, DEFAULT_QUEUE_SIZE),
        queue_workers=or_default(queue_workers, DEFAULT_QUEUE_WORKERS),
        delivery_linger=delivery_linger,
        max_attempts=max_attempts,
        initial_backoff=initial_backoff,
        drain_timeout=drain_timeout,
        max_body_bytes=max_body_bytes,
        max_batch_entries=max_batch_entries,
        shed_policy=shed_policy,
        log_level=log_level,
        metrics_public=metrics_public,
        idempotency_window=idempotency_window,
        shed_resend_window=shed_resend_window,
        body_timeout=body_timeout,
        query_page_bytes=query_page_bytes,
        wal_segment_bytes=wal_segment_bytes,
        generated_secrets=tuple(touched),
    )


def _name(table: dict[str, object], kind: str, layers: Layers) -> str:
    name = table.get("name")
    where = f"[[{kind}]] in {layers.origin}"
    if not isinstance(name, str):
        raise ConfigError(f"every entry of {where} needs a name (a string)")
    if not _NAME.fullmatch(name) or set(name) == {"."}:
        raise ConfigError(
            f"{kind} name {name!r} in {layers.origin}: use 1-64 characters from A-Z a-z 0-9 _ . - (and not only dots)"
        )
    return name


def _check_url(url: object, where: str) -> str:
    if isinstance(url, str):
        if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
            return url
        if url.startswith(("postgresql://", "postgres://")):
            return url
    # The URL itself is not echoed: it may carry a password.
    raise ConfigError(f"{where} must be sqlite:///PATH or postgresql://...")


def _declared_destinations(layers: Layers) -> list[DestinationSettings]:
    declared: list[DestinationSettings] = []
    for table in layers.tables("destinations", _DESTINATION_KEYS):
        name = _name(table, "destinations", layers)
        if any(d.name == name for d in declared):
            raise ConfigError(f"destination {name!r} is declared twice in {layers.origin}")
        url = _check_url(table.get("url"), f"url of destination {name!r} in {layers.origin}")
        declared.append(DestinationSettings(name=name, url=url))
    return declared


def _with_default_destination(
    declared: list[DestinationSettings],
    sources: list[_SourceSpec],
    layers: Layers,
    data_dir: Path,
) -> list[DestinationSettings]:
    """Add or override the 'default' destination from NEXUS_DESTINATION_URL / destination_url."""
    url = layers.read("destination_url", None, _check_url)
    if any(d.name == DEFAULT_NAME for d in declared):
        if "destination_url" in layers.toml:
            raise ConfigError(
                f"{layers.origin} sets the URL of destination 'default' twice: "
                "in destination_url and in [[destinations]]"
            )
        if url is None:
            return declared
        return [replace(d, url=url) if d.name == DEFAULT_NAME else d for d in declared]
    if not any(spec[2] == DEFAULT_NAME for spec in sources):
        # Nothing writes there, so no queue, delivery greenlets or SQLite file for it.
        return declared
    return [*declared, DestinationSettings(DEFAULT_NAME, url or datadir.default_destination_url(data_dir))]


# (rate, burst): both None (unlimited) or both set.
_RateLimit = tuple[float | None, int | None]
# (name, token or None for a generated one, destination, rate limit)
_SourceSpec = tuple[str, str | None, str, _RateLimit]
# A raw setting and where it was found, for its error message.
_Found = tuple[object, str] | None


def _sources(layers: Layers, known_destinations: set[str]) -> list[_SourceSpec]:
    env_token = _env_token(layers, "token")
    tables = layers.tables("sources", _SOURCE_KEYS)
    if not tables:
        limit = _rate_limit(layers.lookup(_RATE_KEY), layers.lookup(_BURST_KEY))
        return [(DEFAULT_NAME, env_token or _toml_token(layers, "token"), DEFAULT_NAME, limit)]
    for key in ("token", _RATE_KEY, _BURST_KEY):
        if key in layers.toml:
            raise ConfigError(
                f"{key} in {layers.origin} is the {key} of the implicit source 'default', "
                f"which [[sources]] replaces; give each source its {key} in [[sources]]"
            )

    specs: list[_SourceSpec] = []
    for table in tables:
        name = _name(table, "sources", layers)
        where = f"source {name!r} in {layers.origin}"
        if any(s[0] == name for s in specs):
            raise ConfigError(f"source {name!r} is declared twice in {layers.origin}")
        destination = table.get("destination", DEFAULT_NAME)
        if not isinstance(destination, str) or destination not in known_destinations:
            raise ConfigError(f"{where} names an unknown destination {destination!r}")
        limit = _table_rate_limit(layers, table, name, where)
        if name == DEFAULT_NAME and env_token is not None:
            specs.append((name, env_token, destination, limit))
        elif "token" in table:
            token = resolve_token(table["token"], f"token of {where}", layers.env)
            specs.append((name, token, destination, limit))
        else:
            specs.append((name, None, destination, limit))
    if not any(s[0] == DEFAULT_NAME for s in specs):
        for key in (_RATE_KEY, _BURST_KEY):
            if _env_found(layers, key) is not None:
                # A limit that silently applies to nothing would be worse than none.
                raise ConfigError(
                    f"{layers.env_name(key)} is a setting of source 'default', "
                    f"which the [[sources]] in {layers.origin} do not declare"
                )
    return specs


def _readers(layers: Layers, names: set[str]) -> dict[str, tuple[str, ...]]:
    """Each [[sources]] table's can_read: a list of declared source names."""
    readers: dict[str, tuple[str, ...]] = {}
    for table in layers.tables("sources", _SOURCE_KEYS):
        if "can_read" not in table:
            continue
        name = str(table["name"])
        where = f"can_read of source {name!r} in {layers.origin}"
        listed = table["can_read"]
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise ConfigError(f"{where} must be a list of source names, got {listed!r}")
        unknown = sorted(set(listed) - names)
        if unknown:
            raise ConfigError(f"{where} names unknown sources {unknown}")
        readers[name] = tuple(dict.fromkeys(listed))
    return readers


def _per_source_names(layers: Layers, names: set[str], key: str) -> dict[str, str]:
    """Each source's `key` (a field or attribute name); for source 'default', its NEXUS_ variable wins over its key."""
    fields: dict[str, str] = {}
    tables = layers.tables("sources", _SOURCE_KEYS)
    env = _env_found(layers, key)
    if not tables:
        found = env if env is not None else ((layers.toml[key], layers.where_toml(key)) if key in layers.toml else None)
        if found is not None:
            fields[DEFAULT_NAME] = _key_field(*found)
        return fields
    if key in layers.toml:
        raise ConfigError(
            f"{key} in {layers.origin} is the {key} of the implicit source 'default', "
            f"which [[sources]] replaces; give each source its {key} in [[sources]]"
        )
    if env is not None and DEFAULT_NAME not in names:
        # A setting that silently applies to nothing would be worse than none.
        raise ConfigError(
            f"{env[1]} is a setting of source 'default', which the [[sources]] in {layers.origin} do not declare"
        )
    for table in tables:
        name = str(table["name"])
        if name == DEFAULT_NAME and env is not None:
            fields[name] = _key_field(*env)
        elif key in table:
            fields[name] = _key_field(table[key], f"{key} of source {name!r} in {layers.origin}")
    return fields


def _key_field(value: object, where: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_FIELD_LENGTH:
        raise ConfigError(f"{where} must be a field name of 1 to {MAX_KEY_FIELD_LENGTH} characters, got {value!r}")
    return value


def _table_rate_limit(layers: Layers, table: dict[str, object], name: str, where: str) -> _RateLimit:
    """A [[sources]] table's rate limit; for source 'default', NEXUS_RATE_LIMIT_* win over its keys."""

    def found(key: str) -> _Found:
        if name == DEFAULT_NAME:
            from_env = _env_found(layers, key)
            if from_env is not None:
                return from_env
        return (table[key], f"{key} of {where}") if key in table else None

    return _rate_limit(found(_RATE_KEY), found(_BURST_KEY))


def _env_found(layers: Layers, key: str) -> _Found:
    name = layers.env_name(key)
    value = layers.env.get(name)
    return (value, name) if value else None


def _rate_limit(rate_found: _Found, burst_found: _Found) -> _RateLimit:
    """(rate, burst) from the raw settings; a rate alone gets a burst of max(1, ceil(rate))."""
    rate = None if rate_found is None else parse_positive(*rate_found)
    burst = None if burst_found is None else parse_integer(*burst_found, minimum=1)
    if rate is None:
        if burst_found is not None:
            raise ConfigError(f"{burst_found[1]} needs a rate: set {_RATE_KEY} too (no rate means no limit)")
        return None, None
    # One second's worth: a source sending at its rate in whole seconds is never refused.
    return rate, burst if burst is not None else max(1, math.ceil(rate))


def _admin_token(layers: Layers) -> str | None:
    return _env_token(layers, "admin_token") or _toml_token(layers, "admin_token")


def _env_token(layers: Layers, key: str) -> str | None:
    """The token in the setting's environment variable, checked; there it is the token itself, not a reference."""
    name = layers.env_name(key)
    token = layers.env.get(name) or None
    if token is not None:
        check_token(token, name)
    return token


def _toml_token(layers: Layers, key: str) -> str | None:
    """The token the TOML key refers to (a literal, env:VAR or file:PATH), checked; None without the key."""
    reference = layers.toml.get(key)
    if reference is None:
        return None
    return resolve_token(reference, layers.where_toml(key), layers.env)


def _check_distinct(sources: list[_SourceSpec], admin_token: str | None) -> None:
    # A token must identify one principal: the HTTP layer tells "unknown token"
    # (401) from "another source's token" (403) by which source owns it.
    owners: dict[str, str] = {}
    for name, token, *_ in sources:
        if token is None:
            continue
        if token in owners:
            raise ConfigError(f"sources {owners[token]!r} and {name!r} have the same token")
        owners[token] = name
    if admin_token is not None and admin_token in owners:
        raise ConfigError(f"the admin token is also the token of source {owners[admin_token]!r}")


def _delivery_linger(value: object, where: str) -> float:
    seconds = parse_seconds(value, where)
    if seconds > MAX_DELIVERY_LINGER:
        raise ConfigError(f"{where} must be at most {MAX_DELIVERY_LINGER:g} seconds, got {seconds:g}")
    return seconds


def _shed_policy(value: object, where: str) -> ShedPolicy:
    word = value.strip().lower() if isinstance(value, str) else value
    if word == "durable":
        return "durable"
    if word == "reject":
        return "reject"
    raise ConfigError(f"{where} must be 'durable' or 'reject', got {value!r}")


def _log_level(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a level name such as 'INFO', got {value!r}")
    try:
        level = parse_level(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: unknown log level {value!r}") from exc
    canonical: str = logging.getLevelName(level)
    return canonical


def _make_dir(path: Path) -> None:
    try:
        ensure_private_dir(path)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {path}: {exc.strerror}") from exc
