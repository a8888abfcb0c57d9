"""One hierarchy for every domain error; the HTTP layer maps them in one place."""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(NexusError):
    """The configuration is invalid; the message says which setting and why."""


class LoadShed(NexusError):
    """The in-memory queue is full; the entry was not buffered (spec: ErrLoadShed)."""

    def __init__(self) -> None:
        super().__init__("queue: channel full, load shed")


class QueueClosed(NexusError):
    """The queue is draining and takes no new entries."""


class WalError(NexusError):
    """Base of the WAL's errors."""


class WalUnavailable(WalError):
    """The WAL could not make an entry durable (disk full, I/O error)."""


class DestinationError(NexusError):
    """Base of the errors a destination raises from a write."""


class DestinationUnavailable(DestinationError):
    """The destination cannot be reached; the entry is not at fault.

    The queue pauses delivery and probes instead of using up attempts
    (an outage must never turn healthy entries into dead letters).
    """


class EntryRejected(DestinationError):
    """The destination refused this entry itself; its attempts are used up."""


class PayloadDecodeError(NexusError):
    """The entry's payload is not a JSON object; it can never be delivered."""


class MalformedOtlp(NexusError):
    """An OTLP request body that does not decode as an ExportLogsServiceRequest; the message says where."""
