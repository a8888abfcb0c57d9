"""The write path: idempotency check, rate limit, durable WAL append, key claim, enqueue.

It reads like the sentence it implements; the HTTP layer has already authenticated
and validated, and maps the outcome (or the domain error raised) to a status.
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import gevent.event

from . import metrics
from .backlog import Backlog
from .entry import Entry, new_payload_id
from .errors import WalUnavailable
from .idempotency import IdempotencyIndex
from .logs import Logger
from .rate_limit import TokenBucket
from .wal import Wal

Outcome = Literal["accepted", "duplicate", "shed", "rejected", "rate_limited"]


class WriteResult(NamedTuple):
    """What became of one write. `payload_id` is None only for a `rejected` or `rate_limited` write.

    A named tuple: one is built per request, and a frozen dataclass costs a
    `object.__setattr__` per field.
    """

    outcome: Outcome
    payload_id: str | None
    retry_after: int | None = None


class Ingest:
    """Makes one entry durable and hands it to its destination's backlog."""

    def __init__(
        self,
        wal: Wal,
        backlogs: dict[str, Backlog],
        index: IdempotencyIndex,
        *,
        shed_policy: str,
        logger: Logger,
        limits: dict[str, TokenBucket] | None = None,
    ) -> None:
        self._wal = wal
        # Only the limited sources have a bucket.
        self._limits = dict(limits or {})
        self._backlogs = backlogs
        self._index = index
        self._reject = shed_policy == "reject"
        self._log = logger
        # Same-worker requests racing on one key wait for the first instead of
        # writing a second entry that would only be discarded.
        self._in_flight: dict[tuple[str, str], gevent.event.AsyncResult[WriteResult]] = {}

    def write(
        self, source: str, destination: str, payload: bytes, *, subject: str | None, key: str | None
    ) -> WriteResult:
        """Accept one entry; raises WalUnavailable when it could not be made durable."""
        try:
            return self._write_once(source, destination, payload, subject, key)
        except WalUnavailable:
            metrics.WAL_FAILURES.inc()
            raise

    def _write_once(
        self, source: str, destination: str, payload: bytes, subject: str | None, key: str | None
    ) -> WriteResult:
        if key is None:
            return self._write(source, destination, payload, subject, None)
        owner = self._index.lookup(source, key)
        if owner is not None:
            return WriteResult("duplicate", owner)
        slot = (source, key)
        racing = self._in_flight.get(slot)
        if racing is not None:
            first = racing.get()
            if first is not None and first.payload_id is not None and first.outcome != "rejected":
                return WriteResult("duplicate", first.payload_id)
        result_box: gevent.event.AsyncResult[WriteResult] = gevent.event.AsyncResult()
        self._in_flight[slot] = result_box
        try:
            result = self._write(source, destination, payload, subject, key)
        except BaseException as exc:
            result_box.set_exception(exc)
            raise
        else:
            result_box.set(result)
            return result
        finally:
            if self._in_flight.get(slot) is result_box:
                del self._in_flight[slot]

    def _write(
        self, source: str, destination: str, payload: bytes, subject: str | None, key: str | None
    ) -> WriteResult:
        # After the duplicate lookup (a resend of a stored key is answered 200 and costs
        # no token), before the WAL: a refused write leaves nothing behind, not even a
        # queue reservation.
        bucket = self._limits.get(source)
        if bucket is not None:
            wait = bucket.take(1)
            if wait is not None:
                return WriteResult("rate_limited", None, wait)
        backlog = self._backlogs[destination]
        reserved = False
        if self._reject:
            # Under `reject`, nothing may be written for a write we will shed, so the
            # slot is held before the WAL append instead of checked after it.
            reserved = backlog.reserve()
            if not reserved:
                return WriteResult("rejected", None, backlog.retry_after())
        entry = Entry(
            payload_id=new_payload_id(),
            source=source,
            destination=destination,
            payload=payload,
            received_at=time.time(),
            subject=subject,
            idempotency_key=key,
        )
        try:
            started = time.perf_counter()
            self._wal.append(entry)
            metrics.WAL_APPEND_LATENCY_BATCH.observe(time.perf_counter() - started)
            if key is not None:
                owner = self._claim(source, key, entry)
                if owner != entry.payload_id:
                    self._wal.mark_discarded([entry.payload_id])
                    if reserved:
                        backlog.reservations.release()
                    return WriteResult("duplicate", owner)
        except BaseException:
            if reserved:
                backlog.reservations.release()
            raise
        # A drain that began while the append waited for its fsync leaves the entry
        # PENDING in this WAL directory, which the next worker to take it over delivers:
        # that is an acknowledgement too (Backlog.offer answers True). A 503 would invite
        # a retry, and the retry would be stored a second time.
        if backlog.offer(entry, reserved=reserved):
            return WriteResult("accepted", entry.payload_id)
        return WriteResult("shed", entry.payload_id, backlog.retry_after())

    def _claim(self, source: str, key: str, entry: Entry) -> str:
        try:
            return self._index.claim(source, key, entry.payload_id, entry.received_at)
        except Exception as exc:
            # Without the claim a retry elsewhere could write a second entry: settle
            # this one unacknowledged, so the client's retry is the only copy.
            self._wal.mark_discarded([entry.payload_id])
            raise WalUnavailable(f"idempotency index unavailable: {exc}") from exc
