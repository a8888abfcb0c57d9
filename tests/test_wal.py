"""The write-ahead log: framing, replay, the Wal's durability and reclaim, and directory locks.

Every test works on real files under tmp_path. Faults are provoked by wrapping the
real os.write (on the WAL's O_DSYNC segments only) / os.fsync (the wrapper still calls the real function unless it is
told to fail), never by mocking the WAL itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import gevent
import orjson
import pytest

import nexus_gevent
from nexus_gevent.entry import Entry
from nexus_gevent.errors import WalUnavailable
from nexus_gevent.testing import RecordingLogger, make_entry
from nexus_gevent.wal import _frame, records
from nexus_gevent.wal._frame import HEADER_SIZE, MAGIC, Damage, Frame, encode, scan
from nexus_gevent.wal.dirlock import LOCK_NAME, DirLock, claim, existing_dirs, try_lock
from nexus_gevent.wal.fold import DELIVERED, DISCARDED, FAILED, PENDING, Fold
from nexus_gevent.wal.log import DEFAULT_SEGMENT_BYTES, Wal
from nexus_gevent.wal.replay import DamageReport, replay_directory
from nexus_gevent.wal.segments import list_segments, segment_path

#: Offsets inside a frame header: MAGIC(4) | crc(4) | length(4) | kind(1) | body.
CRC_AT = 4
LENGTH_AT = 8
KIND_AT = 12

#: A segment size every write exceeds, so each batch gets a segment of its own.
ONE_BATCH_PER_SEGMENT = 1

#: How long a test may wait for close() before it counts as a hang (a guard, not a sync).
HANG_GUARD_SECONDS = 10


# -- helpers ---------------------------------------------------------------------


def numbered(
    i: int,
    *,
    subject: str | None = None,
    key: str | None = None,
    payload: bytes | None = None,
    source: str = "web",
) -> Entry:
    """testing.make_entry, numbered: its id and receive time follow from `i`, so records can be predicted."""
    body = payload if payload is not None else orjson.dumps({"n": i})
    entry = make_entry(f"{i:032x}", payload=body, source=source, destination="main")
    return entry._replace(received_at=1_700_000_000.0 + i, subject=subject, idempotency_key=key)


def entry_frame(entry: Entry) -> bytes:
    return encode(records.ENTRY, records.encode_entry(entry))


def mark_frame(kind: int, *entries: Entry) -> bytes:
    return encode(kind, records.encode_ids([e.payload_id for e in entries]))


def flip(buf: bytes, at: int, mask: int = 0x01) -> bytes:
    """`buf` with the bits of `mask` flipped in the byte at `at`."""
    out = bytearray(buf)
    out[at] ^= mask
    return bytes(out)


def write_segment(directory: Path, number: int, *chunks: bytes) -> Path:
    path = segment_path(directory, number)
    path.write_bytes(b"".join(chunks))
    return path


def segment_numbers(directory: Path) -> list[int]:
    return [number for number, _path in list_segments(directory)]


def pending_ids(directory: Path) -> list[str]:
    return list(replay_directory(directory).pending)


def logged(log: RecordingLogger, level: str, event: str) -> list[dict[str, Any]]:
    """The fields of every `event` logged at `level`."""
    return [r.fields for r in log.at(level) if r.event == event]


def is_write_through(fd: int) -> bool:
    """Whether `fd` was opened O_DSYNC: each write returns only once it is on disk (the WAL's segments)."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC)


class FaultyCall:
    """Wraps a real os function: counts calls; after `successes` real calls, fails the next `failures` with `err`.

    With `only`, calls on a descriptor it refuses go straight to the real function,
    uncounted (os.write serves more than the WAL).
    """

    def __init__(
        self,
        real: Callable[..., Any],
        *,
        successes: int = 0,
        failures: int = 0,
        err: int = errno.ENOSPC,
        only: Callable[[int], bool] | None = None,
    ) -> None:
        self._real = real
        self._only = only
        self._lock = threading.Lock()
        self.successes_left = successes
        self.failures_left = failures
        self.err = err
        self.calls = 0
        #: Size of the file after each successful call: what that call made durable.
        self.synced_sizes: list[int] = []

    def __call__(self, fd: int, *args: Any) -> Any:
        if self._only is not None and not self._only(fd):
            return self._real(fd, *args)
        with self._lock:
            self.calls += 1
            fail = self.successes_left == 0 and self.failures_left > 0
            if fail:
                self.failures_left -= 1
            elif self.successes_left > 0:
                self.successes_left -= 1
        if fail:
            raise OSError(self.err, os.strerror(self.err))
        result = self._real(fd, *args)
        self.synced_sizes.append(os.fstat(fd).st_size)
        return result


class OpenWal(Protocol):
    def __call__(self, *, segment_bytes: int = DEFAULT_SEGMENT_BYTES, replay: bool = True) -> Wal: ...


@pytest.fixture
def log() -> RecordingLogger:
    return RecordingLogger()


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    path = tmp_path / "w0"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def open_wal(wal_dir: Path, log: RecordingLogger) -> Iterator[OpenWal]:
    """Opens Wals on wal_dir (replay, then start; or start alone); closes them after."""
    opened: list[Wal] = []

    def _open(*, segment_bytes: int = DEFAULT_SEGMENT_BYTES, replay: bool = True) -> Wal:
        wal = Wal(wal_dir, segment_bytes=segment_bytes, logger=log)
        if replay:
            wal.replay()
        wal.start()
        opened.append(wal)
        return wal

    yield _open
    for wal in opened:
        with gevent.Timeout(HANG_GUARD_SECONDS):
            wal.close()


@pytest.fixture
def durable_writes(monkeypatch: pytest.MonkeyPatch) -> FaultyCall:
    """Counts the WAL's durable writes (O_DSYNC: write and fdatasync in one call); the real write still runs."""
    spy = FaultyCall(os.write, only=is_write_through)
    monkeypatch.setattr(os, "write", spy)
    return spy


# -- framing ---------------------------------------------------------------------


class TestFrameScan:
    def test_encoded_frames_scan_back_in_order_with_their_offsets(self) -> None:
        """scan() returns every encoded frame, in order, with its kind, body and file offset."""
        bodies = [(records.ENTRY, b"first"), (records.DELIVERED, b""), (records.FAILED, b"x" * 300)]
        frames = [encode(kind, body) for kind, body in bodies]

        found = list(scan(b"".join(frames)))

        offsets = [0, len(frames[0]), len(frames[0]) + len(frames[1])]
        assert found == [Frame(off, kind, body) for off, (kind, body) in zip(offsets, bodies, strict=True)]

    def test_an_empty_buffer_holds_no_records_and_no_damage(self) -> None:
        """An empty file scans as nothing at all."""
        assert list(scan(b"")) == []

    def test_a_frame_is_magic_crc_length_kind_body(self) -> None:
        """The frame layout is MAGIC | crc32 u32le | length u32le | kind u8 | body, the CRC covering what follows it."""
        frame = encode(records.ENTRY, b"abc")
        assert frame[:4] == MAGIC
        assert int.from_bytes(frame[CRC_AT:LENGTH_AT], "little") == zlib.crc32(frame[LENGTH_AT:])
        assert int.from_bytes(frame[LENGTH_AT:KIND_AT], "little") == 3
        assert frame[KIND_AT] == records.ENTRY
        assert frame[HEADER_SIZE:] == b"abc"

    @pytest.mark.parametrize(
        ("region", "at"),
        [
            ("body", HEADER_SIZE + 2),
            ("length", LENGTH_AT),
            ("kind", KIND_AT),
            ("crc", CRC_AT + 1),
        ],
    )
    def test_a_flipped_bit_fails_the_checksum_and_costs_only_that_record(self, region: str, at: int) -> None:
        """One flipped bit in the body, length, kind or crc makes that record damage; its neighbours survive."""
        # Given three records, the middle one with one bit flipped in `region`
        frames = [entry_frame(numbered(i)) for i in range(3)]
        damaged = flip(frames[1], at)

        # When the buffer is scanned
        found = list(scan(frames[0] + damaged + frames[2]))

        # Then the middle record is one damaged run and the others are intact
        assert [type(x) for x in found] == [Frame, Damage, Frame], region
        assert found[1] == Damage(len(frames[0]), len(frames[1]), "checksum mismatch")
        assert isinstance(found[2], Frame)
        assert found[2].offset == len(frames[0]) + len(frames[1])

    @pytest.mark.parametrize(
        ("mask_at", "reason"),
        [((LENGTH_AT + 2, 0x10), "torn record"), ((LENGTH_AT + 3, 0x10), "impossible length")],
    )
    def test_a_length_pointing_past_the_file_does_not_swallow_later_records(
        self, mask_at: tuple[int, int], reason: str
    ) -> None:
        """A damaged length that claims more bytes than exist is damage; the scanner resyncs on the next magic."""
        frames = [entry_frame(numbered(i)) for i in range(3)]
        at, mask = mask_at

        found = list(scan(frames[0] + flip(frames[1], at, mask) + frames[2]))

        assert found[1] == Damage(len(frames[0]), len(frames[1]), reason)
        assert isinstance(found[2], Frame)
        assert records.decode_entry(found[2].body) == numbered(2)

    def test_scan_resynchronises_after_a_corrupt_middle_record(self) -> None:
        """Every intact record after a corrupt one is still found."""
        frames = [entry_frame(numbered(i)) for i in range(6)]
        frames[1] = flip(frames[1], HEADER_SIZE + 5)

        found = list(scan(b"".join(frames)))

        intact = [records.decode_entry(x.body).payload_id for x in found if isinstance(x, Frame)]
        assert intact == [numbered(i).payload_id for i in (0, 2, 3, 4, 5)]
        damage = [x for x in found if isinstance(x, Damage)]
        assert damage == [Damage(len(frames[0]), len(frames[1]), "checksum mismatch")]

    @pytest.mark.parametrize(
        ("cut_into", "reason"),
        [
            (2, "torn header"),  # inside the magic
            (LENGTH_AT + 2, "torn header"),
            (KIND_AT, "torn header"),  # everything but the kind byte
            (HEADER_SIZE, "torn record"),  # a whole header, no body
            (HEADER_SIZE + 7, "torn record"),  # mid-body
        ],
    )
    def test_a_torn_tail_is_damage_at_the_torn_record(self, cut_into: int, reason: str) -> None:
        """A file cut inside its last record reports one Damage from that record's start to the end, without raising."""
        frames = [entry_frame(numbered(i)) for i in range(2)]
        buf = frames[0] + frames[1][:cut_into]

        found = list(scan(buf))

        assert found == [
            Frame(0, records.ENTRY, records.encode_entry(numbered(0))),
            Damage(len(frames[0]), cut_into, reason),
        ]

    def test_adjacent_damaged_records_are_reported_as_one_run(self) -> None:
        """Two corrupt records in a row are one Damage covering both."""
        frames = [entry_frame(numbered(i)) for i in range(4)]
        frames[1] = flip(frames[1], HEADER_SIZE)
        frames[2] = flip(frames[2], KIND_AT)

        damage = [x for x in scan(b"".join(frames)) if isinstance(x, Damage)]

        assert damage == [Damage(len(frames[0]), len(frames[1]) + len(frames[2]), "checksum mismatch")]

    def test_separate_damaged_records_are_reported_separately(self) -> None:
        """Two corrupt records with an intact one between them are two Damage runs."""
        frames = [entry_frame(numbered(i)) for i in range(4)]
        frames[0] = flip(frames[0], HEADER_SIZE)
        frames[2] = flip(frames[2], HEADER_SIZE)

        found = list(scan(b"".join(frames)))

        assert [type(x) for x in found] == [Damage, Frame, Damage, Frame]

    def test_garbage_after_the_last_record_is_one_damaged_run(self) -> None:
        """Bytes appended after valid records are reported as damage where they start."""
        frames = b"".join(entry_frame(numbered(i)) for i in range(2))
        garbage = b"\xff\xfenot a record\x00NX"

        found = list(scan(frames + garbage))

        assert len([x for x in found if isinstance(x, Frame)]) == 2
        assert found[-1] == Damage(len(frames), len(garbage), "bad magic")

    def test_garbage_before_the_first_record_does_not_hide_it(self) -> None:
        """Leading garbage is one damaged run at offset 0, and the records after it are found."""
        garbage = b"garbage!"
        frame = entry_frame(numbered(0))

        assert list(scan(garbage + frame)) == [
            Damage(0, len(garbage), "bad magic"),
            Frame(len(garbage), records.ENTRY, records.encode_entry(numbered(0))),
        ]


# -- records ---------------------------------------------------------------------


class TestRecords:
    def test_an_entry_round_trips_with_every_field(self) -> None:
        """encode_entry/decode_entry keep every field, subject and idempotency key included."""
        entry = numbered(1, subject="orders", key="k-1")
        assert records.decode_entry(records.encode_entry(entry)) == entry

    def test_an_entry_without_subject_or_key_round_trips_to_none(self) -> None:
        """A missing subject and idempotency key come back as None, not as empty strings."""
        entry = numbered(2)
        decoded = records.decode_entry(records.encode_entry(entry))
        assert decoded == entry
        assert decoded.subject is None
        assert decoded.idempotency_key is None

    def test_unicode_and_newlines_and_backslashes_survive_byte_for_byte(self) -> None:
        """Unicode metadata and a payload holding raw newlines and backslashes decode to the same bytes."""
        payload = b'{\n  "path": "C:\\\\tmp\\\\x",\n  "text": "line1\\nline2 \xc3\xa9\xf0\x9f\x98\x80"\n}\n'
        entry = numbered(3, subject="sujet \u00e9\u4e2d\n", key='cl\u00e9\\"', payload=payload, source="s\u00f8urce")

        decoded = records.decode_entry(records.encode_entry(entry))

        assert decoded == entry
        assert decoded.payload == payload

    def test_an_entry_body_never_holds_the_frame_magic(self) -> None:
        """The metadata is JSON text without a NUL byte, so no entry body can forge a frame."""
        entry = numbered(4, subject="\x00NXR", key="\x00", source="\x00NXR")
        assert MAGIC not in records.encode_entry(entry)
        assert records.decode_entry(records.encode_entry(entry)) == entry

    def test_a_body_without_a_metadata_line_is_a_value_error(self) -> None:
        """decode_entry refuses a body that has no newline."""
        with pytest.raises(ValueError, match="metadata"):
            records.decode_entry(b'{"i": "x"}')

    def test_ids_round_trip(self) -> None:
        """encode_ids/decode_ids keep several 32-character ids, in order."""
        ids = [numbered(i).payload_id for i in (5, 1, 9)]
        body = records.encode_ids(ids)
        assert len(body) == 32 * 3
        assert records.decode_ids(body) == ids

    def test_no_ids_round_trip_to_an_empty_list(self) -> None:
        """An empty mark body decodes to no ids."""
        assert records.decode_ids(records.encode_ids([])) == []

    @pytest.mark.parametrize("length", [1, 31, 33, 63])
    def test_decode_ids_rejects_a_body_that_is_not_whole_ids(self, length: int) -> None:
        """A mark body whose length is not a multiple of 32 is a ValueError."""
        with pytest.raises(ValueError, match="whole number of ids"):
            records.decode_ids(b"a" * length)


# -- replay ----------------------------------------------------------------------


class TestFold:
    def test_the_later_record_wins_and_marks_before_an_entry_end_nothing(self) -> None:
        """An entry record makes an id pending at its new place; a mark ends it; a mark before it counts unmatched."""
        fold: Fold[int] = Fold(keep_ended=True)
        a, b = numbered(1).payload_id, numbered(2).payload_id

        fold.mark(records.DELIVERED, records.encode_ids([b]))
        fold.entry(a, 0)
        fold.entry(b, 0)
        fold.mark(records.FAILED, records.encode_ids([a]))
        was_pending = fold.entry(a, 1)

        assert not was_pending
        assert list(fold.pending) == [b, a]
        assert fold.pending[a] == 1
        assert fold.unmatched == 1
        assert fold.counts() == {PENDING: 2, DELIVERED: 0, FAILED: 0, DISCARDED: 0}

    def test_a_mark_gives_its_status_and_an_unknown_kind_is_an_error(self) -> None:
        """Each mark kind gives its own status, the later mark winning; a record of no known kind raises ValueError."""
        fold: Fold[int] = Fold(keep_ended=True)
        ids = [numbered(i).payload_id for i in range(3)]
        for payload_id in ids:
            fold.entry(payload_id, 0)

        fold.mark(records.DELIVERED, records.encode_ids(ids[:2]))
        fold.mark(records.DISCARDED, records.encode_ids(ids[1:2]))
        fold.mark(records.FAILED, records.encode_ids(ids[2:]))

        assert [fold.status(i) for i in ids] == [DELIVERED, DISCARDED, FAILED]
        assert len(fold) == 3
        with pytest.raises(ValueError, match="unknown record kind"):
            fold.mark(ord("?"), records.encode_ids(ids))


class TestReplay:
    def test_pending_is_entries_minus_every_settling_mark_in_wal_order(self, wal_dir: Path) -> None:
        """Replay yields exactly the entries not marked delivered, failed or discarded, oldest first."""
        # Given six entries across two segments, three of them settled by each kind of mark
        e = [numbered(i) for i in range(6)]
        write_segment(wal_dir, 0, *(entry_frame(x) for x in e[:4]), mark_frame(records.DELIVERED, e[0], e[2]))
        write_segment(
            wal_dir,
            1,
            entry_frame(e[4]),
            entry_frame(e[5]),
            mark_frame(records.FAILED, e[3]),
            mark_frame(records.DISCARDED, e[5]),
        )

        # When the directory is replayed
        result = replay_directory(wal_dir)

        # Then only the unsettled entries are pending, in the order they were written
        assert list(result.pending) == [e[1].payload_id, e[4].payload_id]
        assert result.pending[e[1].payload_id] == (e[1], 0)
        assert result.pending[e[4].payload_id] == (e[4], 1)
        assert result.segments == [0, 1]
        assert result.records == 9
        assert result.counts == {"entry": 6, "delivered": 2, "failed": 1, "discarded": 1}
        assert result.damage == []

    def test_segments_are_replayed_in_numeric_order(self, wal_dir: Path) -> None:
        """Segment 10 is read after segment 2, so its marks settle entries of segment 2."""
        e = numbered(1)
        write_segment(wal_dir, 10, mark_frame(records.DELIVERED, e))
        write_segment(wal_dir, 2, entry_frame(e))

        result = replay_directory(wal_dir)

        assert result.segments == [2, 10]
        assert result.pending == {}

    def test_a_mark_before_its_entry_does_not_settle_it(self, wal_dir: Path) -> None:
        """Later records win: an entry written after a mark for its id is pending."""
        e = numbered(1)
        write_segment(wal_dir, 0, mark_frame(records.DELIVERED, e), entry_frame(e))

        assert pending_ids(wal_dir) == [e.payload_id]

    def test_a_later_entry_record_revives_a_settled_id_at_its_new_place(self, wal_dir: Path) -> None:
        """A settled entry written again (a retried dead letter) is pending again, ordered by its new record."""
        e0, e1 = numbered(0), numbered(1)
        write_segment(wal_dir, 0, entry_frame(e0), entry_frame(e1), mark_frame(records.FAILED, e0))
        write_segment(wal_dir, 1, entry_frame(e0))

        result = replay_directory(wal_dir)

        assert list(result.pending) == [e1.payload_id, e0.payload_id]
        assert result.pending[e0.payload_id] == (e0, 1)

    def test_idempotency_keys_of_pending_entries_are_collected_for_the_index(self, wal_dir: Path) -> None:
        """Pending entries come back with their idempotency keys, for the index; a marked one's was claimed long ago."""
        settled, keyed, plain = numbered(0, key="k0"), numbered(1, key="k1"), numbered(2)
        write_segment(
            wal_dir,
            0,
            entry_frame(settled),
            entry_frame(keyed),
            entry_frame(plain),
            mark_frame(records.DELIVERED, settled),
        )

        result = replay_directory(wal_dir)

        # Then exactly the pending keyed entry yields a key, with what the index stores for it
        keys = [
            (e.source, e.idempotency_key, e.payload_id, e.received_at)
            for e, _seg in result.pending.values()
            if e.idempotency_key is not None
        ]
        assert keys == [("web", "k1", keyed.payload_id, keyed.received_at)]

    def test_a_corrupt_middle_record_is_skipped_counted_and_the_rest_still_counts(self, wal_dir: Path) -> None:
        """A corrupt record costs only itself: it is reported with file and offset, and later records still apply."""
        # Given e1's record corrupt, and a later mark settling e0
        e = [numbered(i) for i in range(3)]
        frames = [entry_frame(x) for x in e]
        path = write_segment(
            wal_dir, 0, frames[0], flip(frames[1], HEADER_SIZE + 3), frames[2], mark_frame(records.DELIVERED, e[0])
        )

        # When the directory is replayed
        result = replay_directory(wal_dir)

        # Then e1 is lost to damage, e0 is settled by the later mark, e2 is pending
        assert list(result.pending) == [e[2].payload_id]
        assert result.damage == [DamageReport(path, len(frames[0]), len(frames[1]), "checksum mismatch")]
        assert result.records == 3

    def test_a_torn_tail_is_reported_and_every_record_before_it_counts(self, wal_dir: Path) -> None:
        """A record cut short at the end of a segment is damage at its offset; records before it replay."""
        e = [numbered(i) for i in range(3)]
        frames = [entry_frame(x) for x in e]
        path = write_segment(wal_dir, 0, frames[0], frames[1], frames[2][: len(frames[2]) // 2])

        result = replay_directory(wal_dir)

        assert list(result.pending) == [e[0].payload_id, e[1].payload_id]
        torn_at = len(frames[0]) + len(frames[1])
        assert result.damage == [DamageReport(path, torn_at, len(frames[2]) // 2, "torn record")]

    def test_a_torn_tail_in_an_old_segment_does_not_stop_later_segments(self, wal_dir: Path) -> None:
        """Damage at the end of one segment leaves the next segment fully replayed."""
        e = [numbered(i) for i in range(3)]
        write_segment(wal_dir, 0, entry_frame(e[0]), entry_frame(e[1])[:9])
        write_segment(wal_dir, 1, entry_frame(e[2]), mark_frame(records.DELIVERED, e[0]))

        result = replay_directory(wal_dir)

        assert list(result.pending) == [e[2].payload_id]
        assert [d.path.name for d in result.damage] == [segment_path(wal_dir, 0).name]

    def test_an_empty_directory_replays_to_nothing(self, wal_dir: Path) -> None:
        """No segments means nothing pending, no damage, no segments."""
        result = replay_directory(wal_dir)
        assert (result.pending, result.damage, result.segments, result.records) == ({}, [], [], 0)

    def test_files_that_are_not_segments_are_ignored(self, wal_dir: Path) -> None:
        """The lock file and stray files are not read as segments."""
        (wal_dir / LOCK_NAME).write_text("123\n")
        (wal_dir / "seg-abc.wal").write_bytes(b"junk")
        (wal_dir / "notes.txt").write_bytes(b"junk")

        result = replay_directory(wal_dir)

        assert (result.segments, result.damage) == ([], [])

    @pytest.mark.parametrize(
        "bad",
        [
            _frame.encode(records.ENTRY, b"garbage"),  # no metadata line
            _frame.encode(records.ENTRY, b"{not json\npayload"),
            _frame.encode(records.ENTRY, b"[1, 2]\npayload"),  # JSON, but not an object
            _frame.encode(records.ENTRY, b'{"i": "x"}\npayload'),  # an object missing fields
            _frame.encode(records.ENTRY, b'{"i": [1], "s": "a", "d": "b", "t": 1.0}\npayload'),  # an unhashable id
            _frame.encode(records.DELIVERED, b"short"),  # not a whole number of ids
            _frame.encode(records.DELIVERED, b"\xff" * 32),  # not ascii
            _frame.encode(ord("?"), b"whatever"),  # unknown kind
        ],
    )
    def test_an_undecodable_but_checksummed_body_is_damage_not_an_exception(self, wal_dir: Path, bad: bytes) -> None:
        """A CRC-valid record whose body cannot be read is reported as damage and skipped."""
        e0, e1 = numbered(0), numbered(1)
        first = entry_frame(e0)
        path = write_segment(wal_dir, 0, first, bad, entry_frame(e1))

        result = replay_directory(wal_dir)

        assert list(result.pending) == [e0.payload_id, e1.payload_id]
        assert len(result.damage) == 1
        report = result.damage[0]
        assert (report.path, report.offset) == (path, len(first))
        assert report.reason.startswith("undecodable")
        assert result.records == 2

    def test_progress_is_reported_after_each_segment(self, wal_dir: Path) -> None:
        """The progress callback sees (records, segments done, segments in all) once per segment."""
        write_segment(wal_dir, 0, entry_frame(numbered(0)), entry_frame(numbered(1)))
        write_segment(wal_dir, 1, entry_frame(numbered(2)))
        seen: list[tuple[int, int, int]] = []

        replay_directory(wal_dir, progress=lambda *args: seen.append(args))

        assert seen == [(2, 1, 2), (3, 2, 2)]

    def test_wal_replay_logs_each_damaged_run_at_error_with_file_and_offset(
        self, wal_dir: Path, log: RecordingLogger
    ) -> None:
        """Wal.replay() logs each skipped damaged run at ERROR with its file and offset, and returns the rest."""
        # Given a corrupt middle record in segment 0 and a torn tail in segment 1
        frames = [entry_frame(numbered(i)) for i in range(4)]
        seg0 = write_segment(wal_dir, 0, frames[0], flip(frames[1], HEADER_SIZE), frames[2])
        seg1 = write_segment(wal_dir, 1, frames[3], frames[0][:20])
        wal = Wal(wal_dir, logger=log)

        # When the worker replays its WAL
        try:
            result = wal.replay()
        finally:
            wal.close()

        # Then each damaged run is one ERROR with its location, and intact entries are pending
        errors = logged(log, "error", "wal_damage_skipped")
        assert [(f["file"], f["offset"]) for f in errors] == [
            (str(seg0), len(frames[0])),
            (str(seg1), len(frames[3])),
        ]
        assert [f["reason"] for f in errors] == ["checksum mismatch", "torn record"]
        assert list(result.pending) == [numbered(i).payload_id for i in (0, 2, 3)]
        assert wal.pending_count == 3


# -- the Wal ---------------------------------------------------------------------


class TestWalAppend:
    def test_append_returns_only_once_the_entry_is_on_disk(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """Once append returns, an O_DSYNC write covered its bytes and a new replay sees it, with no flush or close."""
        wal = open_wal()
        entry = numbered(1, subject="s", key="k")

        wal.append(entry)

        assert durable_writes.synced_sizes == [len(entry_frame(entry))]
        assert replay_directory(wal_dir).pending == {entry.payload_id: (entry, 0)}
        assert wal.is_pending(entry.payload_id)

    def test_append_many_makes_every_entry_durable_with_one_fsync(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """append_many returns once all its entries are on disk, committed together in one batch."""
        wal = open_wal()
        entries = [numbered(i) for i in range(5)]

        wal.append_many(entries)

        assert durable_writes.calls == 1
        assert pending_ids(wal_dir) == [e.payload_id for e in entries]
        assert all(wal.is_pending(e.payload_id) for e in entries)

    def test_append_many_of_nothing_writes_nothing(self, open_wal: OpenWal, durable_writes: FaultyCall) -> None:
        """An empty append_many returns at once without an fsync."""
        wal = open_wal()
        wal.append_many([])
        assert durable_writes.calls == 0

    def test_run_io_runs_in_the_wal_thread_and_returns_the_result(self, open_wal: OpenWal) -> None:
        """run_io(fn, *args) runs fn off the calling thread and hands back its return value."""
        wal = open_wal()
        here = threading.get_ident()

        where, total = wal.run_io(lambda a, b: (threading.get_ident(), a + b), 2, 3)

        assert where != here
        assert total == 5

    def test_segment_files_are_private_to_the_owner(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """Segments are created with mode 0600."""
        wal = open_wal()
        wal.append(numbered(1))
        for _number, path in list_segments(wal_dir):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_concurrent_appends_share_fsyncs_and_all_are_durable(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """Group commit: 500 concurrent appends need far fewer than 500 durable writes, and every one is durable."""
        # Given a started WAL
        wal = open_wal()
        entries = [numbered(i) for i in range(500)]

        # When 500 greenlets append at once
        greenlets = [gevent.spawn(wal.append, e) for e in entries]
        gevent.joinall(greenlets, raise_error=True)

        # Then they were committed in a handful of batches, and every entry replays
        assert 1 <= durable_writes.calls <= len(entries) // 10
        assert pending_ids(wal_dir) == [e.payload_id for e in entries]
        assert wal.pending_count == 500

    def test_rotation_spreads_a_small_segment_size_over_several_files(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """Once a segment reaches segment_bytes the next write opens a new one, and replay reads them all."""
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        entries = [numbered(i) for i in range(4)]

        for e in entries:
            wal.append(e)

        assert segment_numbers(wal_dir) == [0, 1, 2, 3]
        assert wal.segment_count == 4
        result = replay_directory(wal_dir)
        assert [result.pending[e.payload_id][1] for e in entries] == [0, 1, 2, 3]

    def test_size_bytes_tracks_what_is_on_disk(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """size_bytes equals the bytes the segment files hold."""
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        for i in range(3):
            wal.append(numbered(i))
        assert wal.size_bytes == sum(p.stat().st_size for _n, p in list_segments(wal_dir))


class TestWalMarks:
    def test_marked_entries_are_not_replayed_after_flush(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """mark_delivered, mark_failed, mark_discarded then flush: a fresh replay excludes them."""
        wal = open_wal()
        e = [numbered(i) for i in range(4)]
        for x in e:
            wal.append(x)

        wal.mark_delivered([e[0].payload_id])
        wal.mark_failed([e[1].payload_id])
        wal.mark_discarded([e[3].payload_id])
        wal.flush()

        assert pending_ids(wal_dir) == [e[2].payload_id]
        assert [wal.is_pending(x.payload_id) for x in e] == [False, False, True, False]
        assert wal.pending_count == 1

    def test_marking_nothing_writes_nothing(self, open_wal: OpenWal, durable_writes: FaultyCall) -> None:
        """An empty list of ids is not a record and costs no fsync."""
        wal = open_wal()
        wal.mark_delivered([])
        wal.flush()
        assert durable_writes.calls == 0

    def test_flush_waits_for_a_batch_already_being_written(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """flush() also waits for marks the flusher has already taken into the I/O thread."""
        # Given an entry and its DELIVERED mark, which the flusher has taken and is writing
        wal = open_wal()
        entry = numbered(1)
        wal.append(entry)
        wal.mark_delivered([entry.payload_id])
        # Yield once: the flusher's wake-up was scheduled before ours, so it takes the
        # batch into the I/O thread, and we are back before that write is accounted.
        gevent.sleep(0)

        # When flush returns
        wal.flush()

        # Then the mark is durable and accounted
        assert not wal.is_pending(entry.payload_id)
        assert pending_ids(wal_dir) == []

    def test_a_retried_dead_letter_is_pending_again(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """An entry marked failed and appended again is pending, in memory and on replay."""
        wal = open_wal()
        entry = numbered(1)
        wal.append(entry)
        wal.mark_failed([entry.payload_id])
        wal.flush()

        wal.append(entry)

        assert wal.is_pending(entry.payload_id)
        assert pending_ids(wal_dir) == [entry.payload_id]


class TestWalReclaim:
    def test_segments_whose_entries_are_all_delivered_are_deleted_but_the_current_stays(
        self, open_wal: OpenWal, wal_dir: Path, log: RecordingLogger
    ) -> None:
        """Once every entry of the old segments is delivered and the marks are durable, their files are gone."""
        # Given three entries, each in its own segment
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        entries = [numbered(i) for i in range(3)]
        for e in entries:
            wal.append(e)
        assert segment_numbers(wal_dir) == [0, 1, 2]

        # When all of them are delivered and the mark is flushed (into segment 3)
        wal.mark_delivered([e.payload_id for e in entries])
        wal.flush()

        # Then segments 0-2 are deleted from disk, and the current one is kept
        assert segment_numbers(wal_dir) == [3]
        assert not segment_path(wal_dir, 0).exists()
        assert wal.segment_count == 1
        assert wal.size_bytes == segment_path(wal_dir, 3).stat().st_size
        assert logged(log, "info", "wal_segments_reclaimed")[-1]["segments"] == 3

    def test_the_current_segment_is_never_deleted(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """A segment still being appended to stays even when all its entries are settled."""
        wal = open_wal()
        entry = numbered(1)
        wal.append(entry)
        wal.mark_delivered([entry.payload_id])
        wal.flush()

        assert segment_numbers(wal_dir) == [0]
        assert pending_ids(wal_dir) == []

    def test_a_segment_with_one_pending_entry_is_kept(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """One unsettled entry keeps its whole segment on disk."""
        # Given e0 and e1 committed together in segment 0, e2 in segment 1
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        e = [numbered(i) for i in range(3)]
        gevent.joinall([gevent.spawn(wal.append, e[0]), gevent.spawn(wal.append, e[1])], raise_error=True)
        wal.append(e[2])
        assert replay_directory(wal_dir).pending[e[1].payload_id][1] == 0

        # When e0 is delivered but e1 is not
        wal.mark_delivered([e[0].payload_id])
        wal.flush()

        # Then segment 0 stays, and e1 still replays from it
        assert segment_path(wal_dir, 0).exists()
        assert pending_ids(wal_dir) == [e[1].payload_id, e[2].payload_id]

    def test_only_a_settled_prefix_is_reclaimed(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """A settled segment after one with a pending entry is kept until the older one settles; then both go."""
        # Given e0, e1, e2 in segments 0, 1, 2
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        e = [numbered(i) for i in range(3)]
        for x in e:
            wal.append(x)

        # When e1 (segment 1) is delivered while e0 (segment 0) is not
        wal.mark_delivered([e[1].payload_id])
        wal.flush()

        # Then nothing is deleted: segment 1 waits behind segment 0
        assert segment_numbers(wal_dir) == [0, 1, 2, 3]

        # When e0 is delivered too
        wal.mark_delivered([e[0].payload_id])
        wal.flush()

        # Then segments 0 and 1 go together; segment 2 holds pending e2 and stays
        assert segment_numbers(wal_dir) == [2, 3, 4]
        assert pending_ids(wal_dir) == [e[2].payload_id]

        # When the last entry is delivered, only the current segment remains
        wal.mark_delivered([e[2].payload_id])
        wal.flush()
        assert segment_numbers(wal_dir) == [5]
        assert pending_ids(wal_dir) == []

    def test_reopening_reclaims_segments_replay_found_settled(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """start() deletes the settled prefix left by a previous run, keeping the segment with a pending entry."""
        # Given a previous run that left e0 delivered (segment 0) and e1 pending (segment 1)
        e0, e1 = numbered(0), numbered(1)
        write_segment(wal_dir, 0, entry_frame(e0))
        write_segment(wal_dir, 1, entry_frame(e1))
        write_segment(wal_dir, 2, mark_frame(records.DELIVERED, e0))

        # When the WAL is opened again
        wal = open_wal()

        # Then segment 0 is gone, the rest stays, and a new segment 3 is current
        assert segment_numbers(wal_dir) == [1, 2, 3]
        assert wal.is_pending(e1.payload_id)
        assert not wal.is_pending(e0.payload_id)

    def test_a_failed_entry_is_reclaimable(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """PERMANENT_FAILURE settles an entry for reclaim just like delivery does."""
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        entry = numbered(1)
        wal.append(entry)
        wal.mark_failed([entry.payload_id])
        wal.flush()
        assert segment_numbers(wal_dir) == [1]


class TestWalRecovery:
    def test_start_after_a_crash_never_appends_after_a_torn_tail(
        self, open_wal: OpenWal, wal_dir: Path, log: RecordingLogger
    ) -> None:
        """A segment with a torn tail is left untouched; new appends go to a fresh segment."""
        # Given a segment ending in a torn record, as a crash mid-write leaves it
        e0, e1, e2 = numbered(0), numbered(1), numbered(2)
        torn = write_segment(wal_dir, 0, entry_frame(e0), entry_frame(e1)[:25])
        before = torn.read_bytes()

        # When the WAL is opened and a new entry appended
        wal = open_wal()
        wal.append(e2)

        # Then the old segment is byte-for-byte unchanged and the entry is in segment 1
        assert torn.read_bytes() == before
        result = replay_directory(wal_dir)
        assert result.pending == {e0.payload_id: (e0, 0), e2.payload_id: (e2, 1)}
        assert [(d.path, d.offset) for d in result.damage] == [(torn, len(entry_frame(e0)))]
        assert [(f["file"], f["offset"]) for f in logged(log, "error", "wal_damage_skipped")] == [
            (str(torn), len(entry_frame(e0)))
        ]

    def test_a_reopened_wal_knows_what_is_pending(self, open_wal: OpenWal, wal_dir: Path, log: RecordingLogger) -> None:
        """Entries appended by one Wal and not settled are pending in the next one over the same directory."""
        first = open_wal()
        e0, e1 = numbered(0), numbered(1)
        first.append(e0)
        first.append(e1)
        first.mark_delivered([e0.payload_id])
        first.close()

        second = Wal(wal_dir, logger=log)
        result = second.replay()
        second.close()

        assert list(result.pending) == [e1.payload_id]
        assert second.pending_count == 1


def started_over_an_old_segment(open_wal: OpenWal, wal_dir: Path, *appended: Entry) -> tuple[Wal, Entry]:
    """Entry 0 left in segment 0 by a previous run, and a WAL started over it without replay
    (a segment per batch) that has appended `appended`, one batch each; returns the WAL and entry 0."""
    old = numbered(0)
    write_segment(wal_dir, 0, entry_frame(old))
    wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT, replay=False)
    for entry in appended:
        wal.append(entry)
    return wal, old


class TestWalReplayAfterStart:
    def test_a_started_wal_takes_appends_before_replay_in_a_new_segment(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """start() before replay() opens a segment after every existing one and appends go there at once."""
        # Given an older segment left by a previous run
        old = numbered(0)
        write_segment(wal_dir, 0, entry_frame(old))

        # When the WAL starts without replaying and takes an append
        wal = open_wal(replay=False)
        live = numbered(1)
        wal.append(live)

        # Then the old segment is untouched and the append is in segment 1
        assert replay_directory(wal_dir).pending == {old.payload_id: (old, 0), live.payload_id: (live, 1)}

    def test_replay_after_start_returns_only_the_older_segments(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """Entries appended since start() are not handed back by replay(), even after rotation."""
        # Given an older segment, and a started WAL that rotated through two live segments
        live = [numbered(1), numbered(2)]
        wal, old = started_over_an_old_segment(open_wal, wal_dir, *live)
        assert segment_numbers(wal_dir) == [0, 1, 2]

        # When the older segments are replayed
        result = wal.replay()

        # Then only the old entry comes back: the live ones are already in the caller's hands
        assert list(result.pending) == [old.payload_id]
        assert result.segments == [0]
        assert result.damage == []
        assert wal.pending_count == 3

    def test_nothing_is_reclaimed_before_replay_and_the_settled_prefix_goes_after(
        self, open_wal: OpenWal, wal_dir: Path
    ) -> None:
        """Until replay() has counted the old segments nothing is deleted; afterwards every settled segment is."""
        # Given an old entry in segment 0, and live entries appended and delivered before replay
        live = [numbered(1), numbered(2)]
        wal, old = started_over_an_old_segment(open_wal, wal_dir, *live)
        wal.mark_delivered([e.payload_id for e in live])
        wal.flush()
        assert segment_numbers(wal_dir) == [0, 1, 2, 3]

        # When replay runs and the old entry is delivered too
        wal.replay()
        wal.mark_delivered([old.payload_id])
        wal.flush()

        # Then every segment but the current one is reclaimed
        assert segment_numbers(wal_dir) == [4]
        assert wal.pending_count == 0
        assert wal.segment_count == 1

    def test_an_entry_written_again_before_replay_does_not_pin_its_old_segment(
        self, open_wal: OpenWal, wal_dir: Path
    ) -> None:
        """An id appended live before replay finds it in an old segment counts once, so delivering it frees both."""
        # Given an old segment holding an entry, and the same entry appended again after start
        # (a retried dead letter does this)
        wal, old = started_over_an_old_segment(open_wal, wal_dir, numbered(0))

        # When replay runs and the entry is delivered
        wal.replay()
        wal.mark_delivered([old.payload_id])
        wal.flush()

        # Then nothing is pending and only the current segment is left
        assert wal.pending_count == 0
        assert wal.segment_count == 1
        assert len(segment_numbers(wal_dir)) == 1


class TestWalFailures:
    def test_a_failed_fsync_raises_truncates_the_batch_and_the_next_append_works(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall, log: RecordingLogger
    ) -> None:
        """ENOSPC on the WAL write: append raises WalUnavailable, no trace of the batch stays, and the WAL recovers."""
        # Given one durable entry, then a disk that fails the next durable write
        wal = open_wal()
        kept, lost, later = numbered(0), numbered(1), numbered(2)
        wal.append(kept)
        durable_writes.failures_left = 1

        # When an append hits the failure
        with pytest.raises(WalUnavailable):
            wal.append(lost)

        # Then the file ends on a whole record and holds no trace of the failed batch
        result = replay_directory(wal_dir)
        assert list(result.pending) == [kept.payload_id]
        assert result.damage == []
        assert segment_path(wal_dir, 0).stat().st_size == len(entry_frame(kept))
        assert not wal.is_pending(lost.payload_id)
        assert [f["errno"] for f in logged(log, "error", "wal_write_failed")] == [errno.ENOSPC]

        # When the cause is gone, the next append succeeds and is durable
        wal.append(later)
        assert pending_ids(wal_dir) == [kept.payload_id, later.payload_id]
        assert wal.pending_count == 2

    def test_every_appender_of_a_failed_batch_gets_wal_unavailable(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """All appends committed in a batch whose fsync failed raise; none of them replays."""
        wal = open_wal()
        durable_writes.failures_left = 1
        greenlets = [gevent.spawn(wal.append, numbered(i)) for i in range(5)]
        gevent.joinall(greenlets)

        assert all(isinstance(g.exception, WalUnavailable) for g in greenlets)
        assert durable_writes.calls == 1
        assert pending_ids(wal_dir) == []

    def test_a_failed_fsync_makes_the_wal_move_to_a_fresh_segment(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """After a failed fsync the page cache is not trusted: the next write opens a new segment."""
        wal = open_wal()
        durable_writes.failures_left = 1
        with pytest.raises(WalUnavailable):
            wal.append(numbered(0))

        wal.append(numbered(1))

        assert replay_directory(wal_dir).pending[numbered(1).payload_id][1] == 1
        assert wal.segment_count == 2

    def test_a_failed_rotation_does_not_wedge_the_wal(
        self, open_wal: OpenWal, wal_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If opening the next segment fails (directory fsync error), the append raises and a later one succeeds."""
        # Given a WAL due to rotate, and a directory fsync that fails once
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        wal.append(numbered(0))
        dir_fsync = FaultyCall(os.fsync, failures=1, err=errno.EIO)
        monkeypatch.setattr(os, "fsync", dir_fsync)

        # When the append that rotates hits the failure
        with pytest.raises(WalUnavailable):
            wal.append(numbered(1))

        # Then the next append, with the disk healthy again, succeeds and is durable
        wal.append(numbered(2))
        assert pending_ids(wal_dir) == [numbered(0).payload_id, numbered(2).payload_id]
        assert dir_fsync.calls >= 2

    def test_a_failed_reclaim_does_not_stop_the_wal(
        self, open_wal: OpenWal, wal_dir: Path, monkeypatch: pytest.MonkeyPatch, log: RecordingLogger
    ) -> None:
        """If deleting settled segments fails, the mark is still durable, flush returns and appends go on."""
        # Given e0 in segment 0, e1 in segment 1, and a directory fsync that will fail
        # at reclaim (the first fsync opens the segment the mark goes to, the second is reclaim's)
        wal = open_wal(segment_bytes=ONE_BATCH_PER_SEGMENT)
        e0, e1, e2 = numbered(0), numbered(1), numbered(2)
        wal.append(e0)
        wal.append(e1)
        monkeypatch.setattr(os, "fsync", FaultyCall(os.fsync, successes=1, failures=1, err=errno.EIO))

        # When e0 is delivered (the guard turns a hang into a failure)
        with gevent.Timeout(HANG_GUARD_SECONDS):
            wal.mark_delivered([e0.payload_id])
            wal.flush()

            # Then the WAL keeps working, and the next settle finishes the reclaim
            wal.append(e2)
            wal.mark_delivered([e1.payload_id])
            wal.flush()
        assert pending_ids(wal_dir) == [e2.payload_id]
        assert not segment_path(wal_dir, 0).exists()
        assert not segment_path(wal_dir, 1).exists()
        assert logged(log, "error", "wal_reclaim_failed")

    def test_a_mark_refused_by_a_failed_write_is_written_with_the_next_batch(
        self, open_wal: OpenWal, wal_dir: Path, durable_writes: FaultyCall
    ) -> None:
        """A DELIVERED mark whose write failed (disk full) is not lost: the next write records it, without a restart."""
        # Given a durable entry, and a disk that fails the next durable write
        wal = open_wal()
        delivered, later = numbered(0), numbered(1)
        wal.append(delivered)
        durable_writes.failures_left = 1
        with gevent.Timeout(HANG_GUARD_SECONDS):
            # When its DELIVERED mark meets the failure
            wal.mark_delivered([delivered.payload_id])
            with pytest.raises(WalUnavailable):
                wal.flush()
            # ... and the next append, with the disk healthy again, succeeds
            wal.append(later)
        # Then the mark went with it: only the later entry is pending, in memory and on disk
        assert wal.pending_count == 1
        assert pending_ids(wal_dir) == [later.payload_id]


class TestWalClose:
    def test_close_is_idempotent(self, open_wal: OpenWal) -> None:
        """A second close() is a no-op."""
        wal = open_wal()
        wal.close()
        wal.close()

    def test_append_after_close_raises_wal_unavailable(self, open_wal: OpenWal) -> None:
        """A closed WAL refuses appends with WalUnavailable."""
        wal = open_wal()
        wal.close()
        with pytest.raises(WalUnavailable):
            wal.append(numbered(1))

    def test_close_makes_unflushed_marks_durable(self, open_wal: OpenWal, wal_dir: Path) -> None:
        """close() writes marks handed to it without a flush, and returns."""
        # Given a delivered mark that nobody flushed
        wal = open_wal()
        entry = numbered(1)
        wal.append(entry)
        wal.mark_delivered([entry.payload_id])

        # When the WAL is closed (the guard turns a hang into a failure)
        with gevent.Timeout(HANG_GUARD_SECONDS):
            wal.close()

        # Then the mark is on disk
        assert pending_ids(wal_dir) == []

    def test_a_wal_that_was_never_started_closes(self, wal_dir: Path, log: RecordingLogger) -> None:
        """close() after replay() alone (a worker that failed to start) releases the thread."""
        wal = Wal(wal_dir, logger=log)
        wal.replay()
        wal.close()
        with pytest.raises(WalUnavailable):
            wal.append(numbered(1))


# -- directory locks -------------------------------------------------------------

_CLAIM_AND_BLOCK = """
import sys
from pathlib import Path
from nexus_gevent.wal.dirlock import claim
held = claim(Path(sys.argv[1]))
print(held.path.name, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held() -> Iterator[list[DirLock]]:
    """Locks a test took; released after it."""
    locks: list[DirLock] = []
    yield locks
    for lock in locks:
        lock.close()


class TestDirLock:
    def test_the_first_claim_takes_w0_with_private_modes(self, tmp_path: Path, held: list[DirLock]) -> None:
        """claim() on a new root creates root and w0 with mode 0700 and a LOCK file 0600 holding our pid."""
        root = tmp_path / "wal"
        lock = claim(root)
        held.append(lock)

        assert lock.path == root / "w0"
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o700
        lock_file = lock.path / LOCK_NAME
        assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
        assert lock_file.read_text() == f"{os.getpid()}\n"

    def test_a_held_directory_is_skipped_for_the_next(self, tmp_path: Path, held: list[DirLock]) -> None:
        """flock is per open file: a second claim in the same process gets w1 while w0 is held."""
        held.append(claim(tmp_path))
        held.append(claim(tmp_path))
        assert [lock.path.name for lock in held] == ["w0", "w1"]

    def test_try_lock_on_a_held_directory_returns_none(self, tmp_path: Path, held: list[DirLock]) -> None:
        """try_lock never blocks: a held directory gives None."""
        held.append(claim(tmp_path))
        assert try_lock(tmp_path / "w0") is None

    def test_a_released_directory_is_claimed_again(self, tmp_path: Path, held: list[DirLock]) -> None:
        """After close(), the lowest directory is free and claim() takes it again."""
        first, second = claim(tmp_path), claim(tmp_path)
        held.append(second)
        first.close()

        again = claim(tmp_path)
        held.append(again)

        assert again.path == tmp_path / "w0"

    def test_close_is_idempotent(self, tmp_path: Path) -> None:
        """Closing a DirLock twice is harmless."""
        lock = claim(tmp_path)
        lock.close()
        lock.close()
        assert lock.fd == -1

    def test_a_directory_held_by_a_killed_process_is_free_again(self, tmp_path: Path, held: list[DirLock]) -> None:
        """A lock dies with its process: after kill -9 the same directory is claimed again."""
        # Given another process holding w0 and blocking
        root = tmp_path / "wal"
        env = {**os.environ, "PYTHONPATH": str(Path(nexus_gevent.__file__).resolve().parent.parent)}
        proc = subprocess.Popen(
            [sys.executable, "-c", _CLAIM_AND_BLOCK, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "w0"
            # While it lives, its directory is not ours
            other = claim(root)
            assert other.path == root / "w1"
            other.close()

            # When it is killed with SIGKILL
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()

        # Then its directory is free at once
        lock = claim(root)
        held.append(lock)
        assert lock.path == root / "w0"

    def test_existing_dirs_lists_only_worker_dirs_in_numeric_order(self, tmp_path: Path) -> None:
        """w2 comes before w10; files and other names are ignored."""
        for name in ("w10", "w2", "w0", "wx", "tmp"):
            (tmp_path / name).mkdir()
        (tmp_path / "w3").write_text("a file")

        assert [p.name for p in existing_dirs(tmp_path)] == ["w0", "w2", "w10"]
        assert existing_dirs(tmp_path / "missing") == []

    def test_claim_takes_a_free_gap_before_creating_a_new_directory(self, tmp_path: Path, held: list[DirLock]) -> None:
        """A free existing directory is reused before a new one is made."""
        (tmp_path / "w0").mkdir()
        (tmp_path / "w1").mkdir()
        held.append(claim(tmp_path))
        held.append(claim(tmp_path))
        held.append(claim(tmp_path))

        assert [lock.path.name for lock in held] == ["w0", "w1", "w2"]
