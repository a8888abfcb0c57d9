"""Replay under damage, as properties: whatever happens to a segment's bytes, replay never
raises, never invents an entry, and loses no entry whose record and marks are untouched.

Each example writes real frames into a real segment file, damages the file in one of
three ways (truncation, flipped bits, appended garbage), and replays the directory.
Which frames are intact is computed from the byte ranges the damage touched.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_gevent.entry import Entry
from nexus_gevent.wal import records
from nexus_gevent.wal._frame import encode, encode_many
from nexus_gevent.wal.replay import ReplayResult, replay_directory
from nexus_gevent.wal.segments import segment_path

#: Enough examples to explore offsets and masks, few enough for a quick suite.
EXAMPLES = 100
MAX_ENTRIES = 8

#: A half-open byte range [start, end) of the segment file.
Span = tuple[int, int]


def _flips(size: int, *, min_size: int, max_size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Distinct byte positions of a buffer of `size` bytes, each with a non-zero XOR mask."""
    return st.lists(
        st.tuples(st.integers(min_value=0, max_value=size - 1), st.integers(min_value=1, max_value=255)),
        min_size=min_size,
        max_size=max_size,
        unique_by=lambda flip: flip[0],
    )


@dataclass(frozen=True)
class Mark:
    span: Span
    kind: int
    payload_ids: tuple[str, ...]


@dataclass(frozen=True)
class Segment:
    """A segment's bytes and where each record sits in it."""

    data: bytes
    entries: dict[str, Entry]
    entry_spans: dict[str, Span]
    marks: tuple[Mark, ...]

    @property
    def boundaries(self) -> set[int]:
        """Every offset at which a record starts or the file ends."""
        ends = {end for _start, end in self.entry_spans.values()} | {m.span[1] for m in self.marks}
        return {0} | ends


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = _json_scalars | st.lists(_json_scalars, max_size=2)
# Pretty-printed payloads put raw newlines into the body after the metadata line.
_payloads = st.builds(
    lambda obj, option: orjson.dumps(obj, option=option),
    st.dictionaries(st.text(max_size=8), _json, max_size=3),
    st.sampled_from([0, orjson.OPT_INDENT_2]),
)


def _entry(payload_id: str) -> st.SearchStrategy[Entry]:
    return st.builds(
        Entry,
        payload_id=st.just(payload_id),
        source=st.text(min_size=1, max_size=8),
        destination=st.sampled_from(["main", "archive", "d\u00e9st"]),
        payload=_payloads,
        received_at=st.floats(allow_nan=False, allow_infinity=False),
        subject=st.none() | st.text(max_size=8),
        idempotency_key=st.none() | st.text(max_size=8),
        # An element's place in a keyed batch: (position, size), position below size.
        batch=st.none() | st.integers(1, 1000).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
    )


@st.composite
def segments(draw: st.DrawFn) -> Segment:
    """K entries in WAL order, each possibly followed by a mark settling some entries written so far."""
    count = draw(st.integers(min_value=1, max_value=MAX_ENTRIES))
    data = bytearray()
    entries: dict[str, Entry] = {}
    spans: dict[str, Span] = {}
    marks: list[Mark] = []
    for i in range(count):
        entry = draw(_entry(f"{i:032x}"))
        frame = encode(records.ENTRY, records.encode_entry(entry))
        entries[entry.payload_id] = entry
        spans[entry.payload_id] = (len(data), len(data) + len(frame))
        data += frame
        if draw(st.booleans()):
            ids = tuple(draw(st.lists(st.sampled_from(sorted(entries)), min_size=1, max_size=3, unique=True)))
            kind = draw(st.sampled_from([records.DELIVERED, records.DELIVERED, records.FAILED, records.DISCARDED]))
            frame = encode(kind, records.encode_ids(ids))
            marks.append(Mark((len(data), len(data) + len(frame)), kind, ids))
            data += frame
    return Segment(bytes(data), entries, spans, tuple(marks))


def replay_bytes(data: bytes) -> ReplayResult:
    """Write `data` as segment 0 of a fresh directory and replay it."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        segment_path(directory, 0).write_bytes(data)
        return replay_directory(directory)


def must_be_pending(seg: Segment, intact: Callable[[Span], bool]) -> set[str]:
    """Entries whose own record is intact and that no intact mark settles."""
    settled = {pid for mark in seg.marks if intact(mark.span) for pid in mark.payload_ids}
    return {pid for pid, span in seg.entry_spans.items() if intact(span) and pid not in settled}


def assert_replay_is_sound(seg: Segment, result: ReplayResult, intact: Callable[[Span], bool]) -> None:
    # Nothing invented: every pending entry is one that was written, field by field.
    for pid, (entry, number) in result.pending.items():
        assert pid in seg.entries
        assert entry == seg.entries[pid]
        assert number == 0
    # Nothing intact lost: an untouched, unsettled entry is pending.
    assert must_be_pending(seg, intact) <= set(result.pending)
    # WAL order is kept: pending entries come in the order they were written.
    assert list(result.pending) == sorted(result.pending)
    for report in result.damage:
        assert report.offset >= 0
        assert report.length > 0


class TestReplayUnderDamage:
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(seg=segments())
    def test_an_undamaged_segment_replays_exactly(self, seg: Segment) -> None:
        """Without damage, pending is exactly the entries no mark settles, and nothing is reported."""
        result = replay_bytes(seg.data)

        assert set(result.pending) == must_be_pending(seg, lambda _span: True)
        assert result.damage == []
        assert result.records == len(seg.entries) + len(seg.marks)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(seg=segments(), data=st.data())
    def test_truncation_at_any_byte_loses_only_the_cut_records(self, seg: Segment, data: st.DataObject) -> None:
        """A file cut at any byte replays every record that ends before the cut, and reports a mid-record cut."""
        cut = data.draw(st.integers(min_value=0, max_value=len(seg.data)), label="cut")

        result = replay_bytes(seg.data[:cut])

        assert_replay_is_sound(seg, result, lambda span: span[1] <= cut)
        if cut in seg.boundaries:
            assert result.damage == []
        else:
            assert len(result.damage) == 1
            assert result.damage[0].offset + result.damage[0].length == cut

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(seg=segments(), data=st.data())
    def test_flipped_bits_lose_only_the_records_they_touch(self, seg: Segment, data: st.DataObject) -> None:
        """Bits flipped anywhere cost only the records holding them, and are always reported."""
        flips = data.draw(_flips(len(seg.data), min_size=1, max_size=6), label="flips")
        damaged = bytearray(seg.data)
        for at, mask in flips:
            damaged[at] ^= mask
        touched = {at for at, _mask in flips}

        result = replay_bytes(bytes(damaged))

        assert_replay_is_sound(seg, result, lambda span: not any(span[0] <= at < span[1] for at in touched))
        assert result.damage

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(seg=segments(), garbage=st.binary(min_size=1, max_size=200))
    def test_garbage_after_the_records_loses_nothing(self, seg: Segment, garbage: bytes) -> None:
        """Random bytes appended to a segment leave every record intact and are reported as damage."""
        result = replay_bytes(seg.data + garbage)

        assert_replay_is_sound(seg, result, lambda _span: True)
        assert set(result.pending) == must_be_pending(seg, lambda _span: True)
        assert result.damage
        assert result.damage[0].offset >= len(seg.data)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(seg=segments(), data=st.data())
    def test_all_three_kinds_of_damage_at_once(self, seg: Segment, data: st.DataObject) -> None:
        """Flips, then a cut, then garbage: replay still never raises, invents nothing, loses nothing intact."""
        flips = data.draw(_flips(len(seg.data), min_size=0, max_size=3), label="flips")
        cut = data.draw(st.integers(min_value=0, max_value=len(seg.data)), label="cut")
        garbage = data.draw(st.binary(max_size=64), label="garbage")
        damaged = bytearray(seg.data)
        for at, mask in flips:
            damaged[at] ^= mask
        touched = {at for at, _mask in flips}

        result = replay_bytes(bytes(damaged[:cut]) + garbage)

        assert_replay_is_sound(
            seg, result, lambda span: span[1] <= cut and not any(span[0] <= at < span[1] for at in touched)
        )


@st.composite
def batches(draw: st.DrawFn) -> list[Entry]:
    """Entries as append_many receives them: runs sharing a request's fields, mixed with arbitrary ones."""
    shared = draw(_entry("0" * 32))
    count = draw(st.integers(min_value=1, max_value=MAX_ENTRIES))
    entries = []
    for i in range(count):
        payload_id = draw(st.sampled_from([f"{i:032x}", f'odd"id\\{i}']))
        if draw(st.booleans()):
            entries.append(shared._replace(payload_id=payload_id, payload=draw(_payloads)))
        else:
            entries.append(draw(_entry(payload_id)))
    return entries


class TestBatchFraming:
    @given(batches())
    @settings(max_examples=EXAMPLES, deadline=None)
    def test_a_batch_framed_in_one_pass_is_byte_for_byte_its_entries_framed_one_by_one(
        self, entries: list[Entry]
    ) -> None:
        """encode_many over encode_entries writes exactly the bytes of encode(encode_entry) per entry."""
        one_pass = encode_many(records.ENTRY, records.encode_entries(entries))
        assert one_pass == b"".join(encode(records.ENTRY, records.encode_entry(e)) for e in entries)
        replayed = replay_bytes(one_pass).pending
        assert [entry for entry, _segment in replayed.values()] == list({e.payload_id: e for e in entries}.values())
