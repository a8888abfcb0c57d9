"""The write path: idempotency check, rate limit, durable WAL append, key claim, enqueue.

It reads like the sentence it implements; the HTTP layer has already authenticated
and validated, and maps the outcome (or the domain error raised) to a status. A batch
takes the same path as one entry, all or nothing: every one of its entries is appended
in one group commit, and the batch is answered once that one durable write is done.

Three kinds of key make a write safe to resend: the request's key (a header: one entry,
or a whole batch), each element's own key (from its body, `element_keys`: a batch's
elements count one by one), and, for a write without any key, the shed resend window
(resend_window.py: the same body again shortly after a durable 429 is a duplicate).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple, TypeVar

import gevent.event

from . import metrics
from .backlog import Backlog
from .entry import Entry, new_payload_id, new_payload_ids
from .errors import WalUnavailable
from .idempotency import IdempotencyIndex, KeyClaim, Owner
from .logs import Logger
from .rate_limit import TokenBucket
from .resend_window import Original, ResendWindow
from .wal import Wal

T = TypeVar("T")

Outcome = Literal["accepted", "duplicate", "shed", "rejected", "rate_limited"]


class WriteResult(NamedTuple):
    """What became of one write: one entry (`payload_id`) or a batch (`payload_ids`, in order).

    Neither is set for a `rejected` or `rate_limited` write. A duplicate carries what
    its key names: a single entry's id, or the ids of the batch first sent with it.
    A named tuple: one is built per request, and a frozen dataclass costs a
    `object.__setattr__` per field.
    """

    outcome: Outcome
    payload_id: str | None
    retry_after: int | None = None
    payload_ids: list[str] | None = None
    #: For a batch whose elements carry their own keys: the indexes of the elements that
    #: were duplicates (their payload_ids are the originals'); None when none was.
    duplicates: list[int] | None = None


def _duplicate(owner: Owner) -> WriteResult:
    if isinstance(owner, str):
        return WriteResult("duplicate", owner)
    return WriteResult("duplicate", None, None, owner)


def _duplicate_of(result: WriteResult) -> WriteResult | None:
    """`result` as the answer to a racing request with the same key; None when it stored nothing."""
    if result.outcome == "rejected":
        return None
    if result.payload_ids is not None:
        return WriteResult("duplicate", None, None, result.payload_ids)
    if result.payload_id is not None:
        return WriteResult("duplicate", result.payload_id)
    return None


def key_claims(entries: Iterable[Entry]) -> list[KeyClaim]:
    """The idempotency claims of entries found on disk: one per single entry, one per batch.

    The entries of one batch share its key, source and receive time, and each knows its
    position in the batch (Entry.batch), so the batch's list of ids is rebuilt in order.
    Some of a batch may be missing (delivered since its key was claimed): the index then
    recognises the claim by the ids it shares with the one it holds.
    """
    claims: list[KeyClaim] = []
    batches: dict[tuple[str, str, float], list[Entry]] = {}
    for entry in entries:
        key = entry.idempotency_key
        if key is None:
            continue
        if entry.batch is None:
            claims.append(KeyClaim(entry.source, key, (entry.payload_id,), entry.received_at, batch=False))
        else:
            batches.setdefault((entry.source, key, entry.received_at), []).append(entry)
    for (source, key, received_at), members in batches.items():
        members.sort(key=lambda m: m.batch[0] if m.batch is not None else 0)
        ids = tuple(m.payload_id for m in members)
        claims.append(KeyClaim(source, key, ids, received_at, batch=True))
    return claims


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
        resends: ResendWindow | None = None,
    ) -> None:
        self._wal = wal
        #: None: the shed resend window is off (NEXUS_SHED_RESEND_WINDOW=0, or the reject policy).
        self._resends = resends
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
            if key is None:
                return self._unkeyed(source, payload, lambda: self._write(source, destination, payload, subject, None))
            return self._once(source, key, lambda: self._write(source, destination, payload, subject, key))
        except WalUnavailable:
            metrics.WAL_FAILURES.inc()
            raise

    def write_batch(
        self,
        source: str,
        destination: str,
        payloads: Sequence[bytes],
        *,
        subject: str | None,
        key: str | None,
        element_keys: Sequence[str | None] | None = None,
        body: bytes | None = None,
        subjects: Sequence[str | None] | None = None,
    ) -> WriteResult:
        """Accept every entry of a batch, or none; raises WalUnavailable when they could not be made durable.

        `key` names the whole batch, and wins over `element_keys` (each element's own key,
        or None). `body` is the decoded request body, for the shed resend window of a batch
        without any key. The caller keeps a batch within the source's burst. `subjects`, when
        given, is each entry's own subject (an OTLP request's records name theirs), in place of
        `subject`; it is not taken together with `element_keys`.
        """
        try:
            if key is None and element_keys is not None and any(k is not None for k in element_keys):
                return self._write_elements(source, destination, payloads, subject, element_keys)
            if key is None:
                return self._unkeyed(
                    source,
                    body,
                    lambda: self._write_batch(source, destination, payloads, subject, None, subjects=subjects),
                )
            return self._once(
                source, key, lambda: self._write_batch(source, destination, payloads, subject, key, subjects=subjects)
            )
        except WalUnavailable:
            metrics.WAL_FAILURES.inc()
            raise

    def _unkeyed(self, source: str, body: bytes | None, write: Callable[[], WriteResult]) -> WriteResult:
        """`write()` unless this body was shed within the resend window; a shed write's body is remembered."""
        resends = self._resends
        if resends is None or body is None:
            return write()
        # The common case (nothing shed lately, in any worker) costs a memory read.
        if resends.active():
            original = self._shed_original(resends, source, body)
            if original is not None:
                return _duplicate(original)
        result = write()
        if result.outcome == "shed":
            self._remember_shed(resends, source, body, result)
        return result

    def _shed_original(self, resends: ResendWindow, source: str, body: bytes) -> Original | None:
        try:
            return resends.lookup(source, body)
        except Exception as exc:
            # Storing the resend again is the safe side: a duplicate row, never a lost entry.
            self._log.warning("resend_window_lookup_failed", source=source, error=str(exc))
            return None

    def _remember_shed(self, resends: ResendWindow, source: str, body: bytes, result: WriteResult) -> None:
        original: Original | None = result.payload_ids if result.payload_ids is not None else result.payload_id
        if original is None:
            return
        try:
            resends.remember(source, body, original)
        except Exception as exc:
            # The entry is durable; only a resend of it would not be recognised.
            self._log.warning("resend_window_write_failed", source=source, error=str(exc))

    def _once(self, source: str, key: str, write: Callable[[], WriteResult]) -> WriteResult:
        """`write()` unless the key is taken, by a stored write or by one of this worker's in flight."""
        owner = self._index.lookup(source, key)
        if owner is not None:
            return _duplicate(owner)
        slot = (source, key)
        racing = self._in_flight.get(slot)
        if racing is not None:
            first = racing.get()
            duplicate = None if first is None else _duplicate_of(first)
            if duplicate is not None:
                return duplicate
        result_box: gevent.event.AsyncResult[WriteResult] = gevent.event.AsyncResult()
        self._in_flight[slot] = result_box
        try:
            result = write()
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
                owner = self._claim(lambda: self._index.claim(source, key, entry.payload_id, entry.received_at), entry)
                if owner != entry.payload_id:
                    self._wal.mark_discarded([entry.payload_id])
                    if reserved:
                        backlog.reservations.release()
                    return _duplicate(owner)
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

    def _write_batch(
        self,
        source: str,
        destination: str,
        payloads: Sequence[bytes],
        subject: str | None,
        key: str | None,
        *,
        subjects: Sequence[str | None] | None = None,
    ) -> WriteResult:
        # The single-entry path's steps, for n entries at once: a batch takes n tokens,
        # reserves n slots under `reject`, and is one WAL append (one group commit).
        n = len(payloads)
        bucket = self._limits.get(source)
        if bucket is not None:
            wait = bucket.take(n)
            if wait is not None:
                return WriteResult("rate_limited", None, wait)
        backlog = self._backlogs[destination]
        reserved = False
        if self._reject:
            reserved = backlog.reserve(n)
            if not reserved:
                return WriteResult("rejected", None, backlog.retry_after())
        received_at = time.time()
        entries = [
            Entry(
                payload_id,
                source,
                destination,
                payload,
                received_at,
                subject if subjects is None else subjects[position],
                key,
                # Only a keyed batch needs its shape on disk: replay claims its key again.
                None if key is None else (position, n),
            )
            for position, (payload_id, payload) in enumerate(zip(new_payload_ids(n), payloads, strict=True))
        ]
        ids = [entry.payload_id for entry in entries]
        try:
            started = time.perf_counter()
            self._wal.append_many(entries)
            metrics.WAL_APPEND_LATENCY_BATCH.observe(time.perf_counter() - started)
            if key is not None:
                owner = self._claim(lambda: self._index.claim_batch(source, key, ids, received_at), *entries)
                if owner != ids:
                    self._wal.mark_discarded(ids)
                    if reserved:
                        backlog.reservations.release(n)
                    return _duplicate(owner)
        except BaseException:
            if reserved:
                backlog.reservations.release(n)
            raise
        # Every entry is offered, in order, even after one had to wait: under `durable`
        # the rest wait behind it in the backlog (all of them are durable already).
        queued = True
        for entry in entries:
            if not backlog.offer(entry, reserved=reserved):
                queued = False
        if queued:
            return WriteResult("accepted", None, None, ids)
        return WriteResult("shed", None, backlog.retry_after(), ids)

    def _write_elements(
        self, source: str, destination: str, payloads: Sequence[bytes], subject: str | None, keys: Sequence[str | None]
    ) -> WriteResult:
        """A batch whose elements carry their own keys: each key counts on its own.

        An element whose key is taken (by a stored write, or by an earlier element of this
        batch) is a duplicate: its payload_id is the original's, and it is not stored. The
        rest are stored like any batch: n tokens, n reserved slots, one WAL append. Two
        such batches racing on a key both reach the WAL; the claim picks one, and the
        other's entry is discarded and answered as a duplicate.
        """
        owners = self._index.lookup_many(source, [k for k in keys if k is not None])
        ids: list[str | None] = [None] * len(payloads)
        #: This batch's first element with each key; a later one with the same key is its duplicate.
        first_with: dict[str, int] = {}
        fresh: list[int] = []
        for index, key in enumerate(keys):
            if key is not None:
                owner = owners.get(key)
                if owner is not None:
                    ids[index] = owner if isinstance(owner, str) else owner[0]
                    continue
                if key in first_with:
                    continue
                first_with[key] = index
            fresh.append(index)
        result, fresh_ids = self._store_elements(source, destination, subject, [(payloads[i], keys[i]) for i in fresh])
        if result is not None and result.outcome in ("rate_limited", "rejected"):
            return result
        stored = set(result.payload_ids or ()) if result is not None else set()
        for index, fresh_id in zip(fresh, fresh_ids, strict=True):
            ids[index] = fresh_id
        answered: list[str] = []
        duplicates: list[int] = []
        for index, key in enumerate(keys):
            # An element repeating a key of this batch takes the id its first one ended with.
            first = index if key is None else first_with.get(key, index)
            pid = ids[first]
            assert pid is not None
            answered.append(pid)
            if first != index or pid not in stored:
                duplicates.append(index)
        if result is None:
            return WriteResult("duplicate", None, None, answered, duplicates)
        return WriteResult(result.outcome, None, result.retry_after, answered, duplicates or None)

    def _store_elements(
        self, source: str, destination: str, subject: str | None, elements: list[tuple[bytes, str | None]]
    ) -> tuple[WriteResult | None, list[str]]:
        """Store `elements` (payload, key): the outcome, and each element's payload_id (the winner's, for a lost claim).

        The outcome's payload_ids are those stored; it is None when none was (every claim lost).
        """
        n = len(elements)
        if n == 0:
            return None, []
        backlog = self._backlogs[destination]
        admitted = self._admit(source, backlog, n)
        if isinstance(admitted, WriteResult):
            return admitted, []
        reserved = admitted
        received_at = time.time()
        # Each entry is keyed on its own (batch None): replay claims it as a single entry.
        entries = [
            Entry(payload_id, source, destination, payload, received_at, subject, key)
            for payload_id, (payload, key) in zip(new_payload_ids(n), elements, strict=True)
        ]
        try:
            started = time.perf_counter()
            self._wal.append_many(entries)
            metrics.WAL_APPEND_LATENCY_BATCH.observe(time.perf_counter() - started)
            ids = self._claim_each(entries)
            stored = [entry for entry, pid in zip(entries, ids, strict=True) if pid == entry.payload_id]
            if len(stored) < n:
                self._wal.mark_discarded(
                    [e.payload_id for e, pid in zip(entries, ids, strict=True) if pid != e.payload_id]
                )
                if reserved:
                    backlog.reservations.release(n - len(stored))
        except BaseException:
            if reserved:
                backlog.reservations.release(n)
            raise
        if not stored:
            return None, ids
        queued = True
        for entry in stored:
            if not backlog.offer(entry, reserved=reserved):
                queued = False
        stored_ids = [entry.payload_id for entry in stored]
        if queued:
            return WriteResult("accepted", None, None, stored_ids), ids
        return WriteResult("shed", None, backlog.retry_after(), stored_ids), ids

    def _admit(self, source: str, backlog: Backlog, n: int) -> WriteResult | bool:
        """Take n tokens and, under `reject`, n slots: whether slots are reserved, or the refusal."""
        bucket = self._limits.get(source)
        if bucket is not None:
            wait = bucket.take(n)
            if wait is not None:
                return WriteResult("rate_limited", None, wait)
        if not self._reject:
            return False
        if not backlog.reserve(n):
            return WriteResult("rejected", None, backlog.retry_after())
        return True

    def _claim_each(self, entries: list[Entry]) -> list[str]:
        """Claim the key of each keyed entry (one transaction): each entry's owner, its own id when unkeyed."""
        claims = [
            KeyClaim(e.source, e.idempotency_key, (e.payload_id,), e.received_at, batch=False)
            for e in entries
            if e.idempotency_key is not None
        ]
        won = iter(self._claim(lambda: self._index.claim_each(claims), *entries))
        ids: list[str] = []
        for entry in entries:
            if entry.idempotency_key is None:
                ids.append(entry.payload_id)
                continue
            owner = next(won)
            # A key first sent as a whole batch's header key names that batch: its first id.
            ids.append(owner if isinstance(owner, str) else owner[0])
        return ids

    def _claim(self, claim: Callable[[], T], *entries: Entry) -> T:
        try:
            return claim()
        except Exception as exc:
            # Without the claim a retry elsewhere could write a second copy: settle
            # these entries unacknowledged, so the client's retry is the only copy.
            self._wal.mark_discarded([entry.payload_id for entry in entries])
            raise WalUnavailable(f"idempotency index unavailable: {exc}") from exc
