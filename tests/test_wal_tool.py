"""The offline WAL tool: `python -m nexus_gevent wal verify|inspect|dead-letters`.

Every test works on a real data directory under tmp_path, written by the real Wal
(or framed with _frame.encode where a test needs bytes the Wal never writes), and
runs the tool in-process through main(argv); one test runs it as a module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gevent
import orjson
import pytest

import nexus_gevent
from nexus_gevent import datadir
from nexus_gevent.cli import EXIT_DAMAGE, EXIT_ERROR, EXIT_OK, main
from nexus_gevent.cli import datadir as tool_datadir
from nexus_gevent.cli.progress import Progress
from nexus_gevent.deadletters import DeadLetterStore
from nexus_gevent.entry import Entry
from nexus_gevent.testing import RecordingLogger, make_entry
from nexus_gevent.wal import records
from nexus_gevent.wal._frame import HEADER_SIZE, Frame, encode, scan
from nexus_gevent.wal.dirlock import DirLock, try_lock
from nexus_gevent.wal.log import Wal
from nexus_gevent.wal.replay import replay_directory
from nexus_gevent.wal.segments import list_segments, segment_path

#: A segment size every write exceeds, so each batch gets a segment of its own.
ONE_BATCH_PER_SEGMENT = 1
#: How long closing a Wal may take before the test counts it as a hang.
HANG_GUARD_SECONDS = 10


# -- helpers ---------------------------------------------------------------------


def numbered(i: int, *, source: str = "web", destination: str = "main", payload: bytes | None = None) -> Entry:
    """testing.make_entry, numbered: id, receive time and subject (even numbers only) follow from `i`."""
    body = payload if payload is not None else orjson.dumps({"n": i})
    entry = make_entry(f"{i:032x}", payload=body, source=source, destination=destination)
    return entry._replace(received_at=1_700_000_000.0 + i, subject=f"subject-{i}" if i % 2 == 0 else None)


def ids(entries: Sequence[Entry]) -> list[str]:
    return [e.payload_id for e in entries]


def write_wal(
    directory: Path,
    entries: Sequence[Entry],
    *,
    delivered: Sequence[Entry] = (),
    failed: Sequence[Entry] = (),
    discarded: Sequence[Entry] = (),
    segment_bytes: int = 64 * 1024 * 1024,
) -> None:
    """Append `entries` with the real Wal, then mark some; one batch per call, so with
    ONE_BATCH_PER_SEGMENT the entries and each kind of mark land in segments of their own."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    wal = Wal(directory, segment_bytes=segment_bytes, logger=RecordingLogger())
    wal.start()
    try:
        wal.append_many(entries)
        for mark, settled in (
            (wal.mark_delivered, delivered),
            (wal.mark_failed, failed),
            (wal.mark_discarded, discarded),
        ):
            if settled:
                mark(ids(settled))
                wal.flush()
    finally:
        with gevent.Timeout(HANG_GUARD_SECONDS):
            wal.close()


def frames(path: Path) -> list[Frame]:
    return [item for item in scan(path.read_bytes()) if isinstance(item, Frame)]


def frame_length(frame: Frame) -> int:
    return HEADER_SIZE + len(frame.body)


def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def only_segment(directory: Path) -> Path:
    segments = list_segments(directory)
    assert len(segments) == 1
    return segments[0][1]


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: size, mtime and content hash, to prove nothing changed."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, object]:
        value = json.loads(self.out)
        assert isinstance(value, dict)
        return value

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.out.splitlines()]


def run_tool(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def directory_report(run: Run, index: int = 0) -> dict[str, object]:
    directories = run.json()["directories"]
    assert isinstance(directories, list)
    report = directories[index]
    assert isinstance(report, dict)
    return report


def damage_of(run: Run) -> list[dict[str, object]]:
    damage = directory_report(run)["damage"]
    assert isinstance(damage, list)
    return damage


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "var"
    (path / "wal").mkdir(parents=True)
    return path


@pytest.fixture
def w0(data_dir: Path) -> Path:
    return data_dir / "wal" / "w0"


@pytest.fixture
def held(w0: Path) -> Iterator[DirLock]:
    """w0 held the way a live worker holds it."""
    lock = try_lock(w0)
    assert lock is not None
    yield lock
    lock.close()


# -- wal verify ------------------------------------------------------------------


class TestVerify:
    def test_healthy_wal_exits_0_with_counts_per_status(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """A healthy WAL exits 0 and reports segments, records, bytes and entries by final status."""
        entries = [numbered(i) for i in range(10)]
        write_wal(w0, entries, delivered=entries[:3], failed=entries[3:5], discarded=entries[5:6])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json")

        assert result.code == EXIT_OK
        assert result.json()["status"] == "healthy"
        report = directory_report(result)
        assert report["entries"] == {"total": 10, "pending": 4, "delivered": 3, "failed": 2, "discarded": 1}
        assert report["records"] == 13  # 10 entries and 3 marks
        assert report["segments"] == 1
        assert report["bytes"] == only_segment(w0).stat().st_size
        assert report["damage"] == []
        assert len(replay_directory(w0).pending) == 4  # the service's replay agrees

    def test_counts_span_segments_and_directories(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        """Totals add up every segment of every WAL directory."""
        first = [numbered(i) for i in range(4)]
        second = [numbered(i) for i in range(10, 13)]
        write_wal(data_dir / "wal" / "w0", first, delivered=first[:1], segment_bytes=ONE_BATCH_PER_SEGMENT)
        write_wal(data_dir / "wal" / "w1", second)

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(data_dir), "--json")

        assert result.code == EXIT_OK
        assert directory_report(result, 0)["segments"] == 2
        totals = result.json()["totals"]
        assert isinstance(totals, dict)
        assert totals["directories"] == 2
        assert totals["entries"] == 7
        assert totals["pending"] == 6
        assert totals["delivered"] == 1

    def test_text_report_is_readable(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """Without --json the report names the directory, its figures and a one-word result."""
        entries = [numbered(i) for i in range(3)]
        write_wal(w0, entries, delivered=entries[:1])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent))

        assert result.code == EXIT_OK
        assert f"w0: {w0}" in result.out
        assert "entries 3: pending 2, delivered 1, failed 0, discarded 0" in result.out
        assert "damaged runs 0" in result.out
        assert result.out.endswith("result: healthy\n")

    def test_corrupted_records_exit_1_with_exact_offsets(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """Two corrupted records (not adjacent) are reported as exactly two runs at their frames' offsets."""
        write_wal(w0, [numbered(i) for i in range(12)])
        segment = only_segment(w0)
        intact = frames(segment)
        hit = [intact[3], intact[8]]
        for frame in hit:
            flip_byte(segment, frame.offset + HEADER_SIZE + 2)  # inside the body

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json")

        assert result.code == EXIT_DAMAGE
        assert result.json()["status"] == "damaged"
        assert damage_of(result) == [
            {
                "file": str(segment),
                "offset": frame.offset,
                "length": frame_length(frame),
                "reason": "checksum mismatch",
                "torn_tail": False,
            }
            for frame in hit
        ]
        report = directory_report(result)
        assert report["records"] == 10
        assert report["damaged_runs"] == 2

    def test_corruption_is_listed_in_the_text_report(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """The text report gives file, offset, length and reason of each damaged run."""
        write_wal(w0, [numbered(i) for i in range(4)])
        segment = only_segment(w0)
        frame = frames(segment)[1]
        flip_byte(segment, frame.offset + HEADER_SIZE + 1)

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent))

        assert result.code == EXIT_DAMAGE
        line = f"{segment} offset {frame.offset} length {frame_length(frame)}: checksum mismatch"
        assert line in result.out
        assert result.out.endswith("result: DAMAGED\n")

    def test_torn_tail_is_reported_as_one(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """A record cut short at the end of its segment is a damaged run flagged as a torn tail."""
        write_wal(w0, [numbered(i) for i in range(5)])
        segment = only_segment(w0)
        last = frames(segment)[-1]
        cut = last.offset + HEADER_SIZE + 3
        segment.write_bytes(segment.read_bytes()[:cut])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json")

        assert result.code == EXIT_DAMAGE
        assert damage_of(result) == [
            {
                "file": str(segment),
                "offset": last.offset,
                "length": cut - last.offset,
                "reason": "torn record",
                "torn_tail": True,
            }
        ]
        assert directory_report(result)["entries"] == {
            "total": 4,
            "pending": 4,
            "delivered": 0,
            "failed": 0,
            "discarded": 0,
        }

    def test_allow_torn_tail_exits_0_on_a_torn_tail_alone(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """--allow-torn-tail accepts the damage a crash mid-write leaves, and still reports it."""
        write_wal(w0, [numbered(i) for i in range(3)])
        segment = only_segment(w0)
        segment.write_bytes(segment.read_bytes()[:-5])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--allow-torn-tail")

        assert result.code == EXIT_OK
        assert "[torn tail]" in result.out

    def test_allow_torn_tail_still_fails_on_corruption_inside(
        self, capsys: pytest.CaptureFixture[str], w0: Path
    ) -> None:
        """--allow-torn-tail does not excuse a corrupt record that is not at the end."""
        write_wal(w0, [numbered(i) for i in range(3)])
        segment = only_segment(w0)
        flip_byte(segment, frames(segment)[0].offset + HEADER_SIZE)

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--allow-torn-tail")

        assert result.code == EXIT_DAMAGE

    def test_intact_frame_of_unknown_kind_is_damage(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """A frame whose checksum holds but whose kind is unknown is damage, as replay counts it."""
        w0.mkdir()
        entry = encode(records.ENTRY, records.encode_entry(numbered(1)))
        strange = encode(ord("Q"), b"{}")
        path = segment_path(w0, 0)
        path.write_bytes(entry + strange)

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json")

        assert result.code == EXIT_DAMAGE
        [run] = damage_of(result)
        assert run["offset"] == len(entry)
        assert run["length"] == len(strange)
        assert str(run["reason"]).startswith("undecodable: unknown record kind")
        assert [d.offset for d in replay_directory(w0).damage] == [len(entry)]

    def test_statuses_follow_replay_for_revived_and_reclaimed_entries(
        self, capsys: pytest.CaptureFixture[str], w0: Path
    ) -> None:
        """A retried dead letter is pending again, and a mark whose entry was reclaimed is counted apart."""
        w0.mkdir()
        revived, gone = numbered(1), numbered(2)
        segment_path(w0, 0).write_bytes(
            encode(records.DELIVERED, records.encode_ids([gone.payload_id]))
            + encode(records.ENTRY, records.encode_entry(revived))
            + encode(records.FAILED, records.encode_ids([revived.payload_id]))
            + encode(records.ENTRY, records.encode_entry(revived))
        )

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json")

        assert result.code == EXIT_OK
        report = directory_report(result)
        assert report["entries"] == {"total": 1, "pending": 1, "delivered": 0, "failed": 0, "discarded": 0}
        assert report["unmatched_marks"] == 1
        assert list(replay_directory(w0).pending) == [revived.payload_id]

    def test_empty_wal_root_is_healthy(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        """A data directory whose wal/ holds no worker directory yet has nothing to be damaged."""
        result = run_tool(capsys, "wal", "verify", "--data-dir", str(data_dir), "--json")

        assert result.code == EXIT_OK
        assert result.json()["directories"] == []


# -- the data directory, locks and progress, shared by the WAL commands ------------


class TestDataDirectory:
    def test_missing_data_dir_exits_2(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A data directory that does not exist is a usage error, named on stderr."""
        missing = tmp_path / "nowhere"

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(missing))

        assert result.code == EXIT_ERROR
        assert result.out == ""
        assert f"data directory not found: {missing}" in result.err

    def test_data_dir_without_wal_exits_2(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """A directory with no wal/ in it is most likely the wrong --data-dir: exit 2."""
        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(tmp_path))

        assert result.code == EXIT_ERROR
        assert "no WAL under" in result.err

    def test_data_dir_comes_from_the_environment(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, w0: Path
    ) -> None:
        """Without --data-dir the tool reads $NEXUS_DATA_DIR."""
        write_wal(w0, [numbered(1)])
        monkeypatch.setenv("NEXUS_DATA_DIR", str(w0.parent.parent))

        result = run_tool(capsys, "wal", "inspect")

        assert result.code == EXIT_OK
        assert result.out.startswith(numbered(1).payload_id)

    def test_unknown_command_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        """argparse's usage errors come back as exit code 2, not as SystemExit."""
        result = run_tool(capsys, "wal", "repair")

        assert result.code == EXIT_ERROR
        assert "invalid choice" in result.err

    def test_locked_directory_exits_2(self, capsys: pytest.CaptureFixture[str], w0: Path, held: DirLock) -> None:
        """A WAL directory a live worker holds is refused with 'stop the service first', before any output."""
        write_wal(w0, [numbered(1)])

        for command in ("verify", "inspect"):
            result = run_tool(capsys, "wal", command, "--data-dir", str(w0.parent.parent))

            assert result.code == EXIT_ERROR
            assert result.out == ""
            assert "stop the service first" in result.err
            assert str(w0) in result.err

    def test_force_reads_a_locked_directory(self, capsys: pytest.CaptureFixture[str], w0: Path, held: DirLock) -> None:
        """--force reads a held directory anyway, says so, and flags it in the report."""
        write_wal(w0, [numbered(1)])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--force", "--json")

        assert result.code == EXIT_OK
        assert directory_report(result)["locked"] is True
        assert "held by a running service" in result.err

    def test_locks_are_released_after_a_run(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """The tool holds WAL directories only while it reads them: a worker can claim them afterwards."""
        write_wal(w0, [numbered(1)])
        first = try_lock(w0)
        assert first is not None
        first.close()

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent))

        assert result.code == EXIT_OK
        again = try_lock(w0)
        assert again is not None
        again.close()

    def test_the_tool_never_writes_to_the_data_directory(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """verify, inspect and dead-letters leave every file, LOCK and dead-letters.db included, untouched."""
        entries = [numbered(i) for i in range(3)]
        write_wal(w0, entries, failed=entries[:1])
        lock = try_lock(w0)
        assert lock is not None
        lock.close()
        data_dir = w0.parent.parent
        store = DeadLetterStore(data_dir / datadir.DEAD_LETTERS_FILENAME)
        store.record(entries[0], "boom", 3)
        store.close()
        before = tree_snapshot(data_dir)

        for argv in (["verify"], ["inspect", "--status", "all", "--show-payload"], ["dead-letters"]):
            assert run_tool(capsys, "wal", *argv, "--data-dir", str(data_dir)).code == EXIT_OK

        assert tree_snapshot(data_dir) == before

    def test_progress_goes_to_stderr_only(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """--progress writes progress lines to stderr; stdout stays the report alone."""
        write_wal(w0, [numbered(i) for i in range(3)], delivered=[numbered(0)], segment_bytes=ONE_BATCH_PER_SEGMENT)

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent), "--json", "--progress")

        assert result.code == EXIT_OK
        assert result.json()["status"] == "healthy"
        assert "wal: 4 records, 2/2 segments" in result.err

    def test_no_progress_when_stderr_is_not_a_terminal(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """Without --progress, progress is shown only on a terminal; captured stderr is none."""
        write_wal(w0, [numbered(1)])

        result = run_tool(capsys, "wal", "verify", "--data-dir", str(w0.parent.parent))

        assert result.err == ""

    def test_progress_prints_at_most_every_half_second(self) -> None:
        """Progress lines are throttled by time, with one closing line of totals."""
        now = [0.0]
        stream = io.StringIO()
        progress = Progress(stream, 4, enabled=True, clock=lambda: now[0])
        for t, records_done in ((0.1, 10), (0.3, 10), (0.6, 10), (0.8, 10)):
            now[0] = t
            progress.advance(records_done, 1)
        progress.finish()

        lines = stream.getvalue().splitlines()
        assert len(lines) == 2
        assert lines[0].startswith("wal: 30 records, 3/4 segments, 50 records/s")
        assert lines[1].startswith("wal: 40 records, 4/4 segments")

    def test_the_tool_finds_the_wal_and_dead_letters_where_the_service_puts_them(self, tmp_path: Path) -> None:
        """The tool reads the WAL directories and dead-letters file at the paths nexus_gevent.datadir gives."""
        # Given a data directory laid out by nexus_gevent.datadir, as the service lays it out
        wal_dir = datadir.wal_root(tmp_path) / "w0"
        write_wal(wal_dir, [numbered(0)])
        DeadLetterStore(datadir.dead_letters_file(tmp_path)).close()

        # When the tool looks for them, Then it finds exactly those
        assert tool_datadir.wal_directories(tmp_path) == [wal_dir]
        assert tool_datadir.dead_letters_file(tmp_path) == datadir.dead_letters_file(tmp_path)

    def test_module_entry_point_runs_verify(self, w0: Path) -> None:
        """`python -m nexus_gevent wal verify` runs as a process and exits with the verify code."""
        write_wal(w0, [numbered(i) for i in range(3)])
        segment = only_segment(w0)
        flip_byte(segment, frames(segment)[1].offset + HEADER_SIZE)
        env = {**os.environ, "PYTHONPATH": str(Path(nexus_gevent.__file__).resolve().parent.parent)}

        done = subprocess.run(
            [sys.executable, "-m", "nexus_gevent", "wal", "verify", "--data-dir", str(w0.parent.parent), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

        assert done.returncode == EXIT_DAMAGE, done.stderr
        assert json.loads(done.stdout)["directories"][0]["damaged_runs"] == 1


# -- wal inspect -----------------------------------------------------------------


class TestInspect:
    @pytest.fixture
    def entries(self, w0: Path) -> list[Entry]:
        """Eight entries from two sources: 0-1 delivered, 2 failed, 3 discarded, 4-7 pending."""
        made = [numbered(i, source="web" if i % 2 else "app") for i in range(8)]
        write_wal(w0, made, delivered=made[:2], failed=made[2:3], discarded=made[3:4])
        return made

    @staticmethod
    def listed(run: Run) -> list[str]:
        return [line.split("\t")[0] for line in run.out.splitlines()]

    def test_default_lists_pending_entries_in_wal_order(
        self, capsys: pytest.CaptureFixture[str], w0: Path, entries: list[Entry]
    ) -> None:
        """Without --status, inspect lists the pending entries, oldest first."""
        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent))

        assert result.code == EXIT_OK
        assert self.listed(result) == ids(entries[4:])

    @pytest.mark.parametrize(
        ("status", "expected"),
        [("delivered", [0, 1]), ("failed", [2]), ("discarded", [3]), ("all", list(range(8)))],
    )
    def test_status_filter(
        self,
        capsys: pytest.CaptureFixture[str],
        w0: Path,
        entries: list[Entry],
        status: str,
        expected: list[int],
    ) -> None:
        """--status picks entries by their final status; 'all' lists every one."""
        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent), "--status", status)

        assert self.listed(result) == [entries[i].payload_id for i in expected]

    def test_source_filter_combines_with_status(
        self, capsys: pytest.CaptureFixture[str], w0: Path, entries: list[Entry]
    ) -> None:
        """--source narrows the status filter's list to one source."""
        data_dir = str(w0.parent.parent)

        result = run_tool(capsys, "wal", "inspect", "--data-dir", data_dir, "--source", "web", "--status", "all")

        assert self.listed(result) == [entries[i].payload_id for i in (1, 3, 5, 7)]

    def test_destination_filter(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """--destination lists only the entries bound for that destination."""
        made = [numbered(1, destination="main"), numbered(2, destination="audit")]
        write_wal(w0, made)

        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent), "--destination", "audit")

        assert self.listed(result) == [made[1].payload_id]

    def test_payload_id_finds_one_entry(
        self, capsys: pytest.CaptureFixture[str], w0: Path, entries: list[Entry]
    ) -> None:
        """--payload-id with --status all finds one entry whatever its status."""
        wanted = entries[2].payload_id
        data_dir = str(w0.parent.parent)

        result = run_tool(capsys, "wal", "inspect", "--data-dir", data_dir, "--payload-id", wanted, "--status", "all")

        assert self.listed(result) == [wanted]
        assert result.out.split("\t")[1] == "failed"

    def test_limit_caps_the_list(self, capsys: pytest.CaptureFixture[str], w0: Path, entries: list[Entry]) -> None:
        """--limit N prints the first N matches only."""
        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent), "--limit", "2")

        assert self.listed(result) == ids(entries[4:6])

    def test_text_line_fields(self, capsys: pytest.CaptureFixture[str], w0: Path, entries: list[Entry]) -> None:
        """A line holds payload_id, status, source, destination, subject, received_at and payload size."""
        wanted = entries[4]
        data_dir = str(w0.parent.parent)

        result = run_tool(capsys, "wal", "inspect", "--data-dir", data_dir, "--payload-id", wanted.payload_id)

        assert (
            result.out
            == "\t".join(
                [
                    wanted.payload_id,
                    "pending",
                    "app",
                    "main",
                    "subject-4",
                    "2023-11-14T22:13:24.000+00:00",
                    str(len(wanted.payload)),
                ]
            )
            + "\n"
        )

    def test_json_lines_with_payload(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """--json --show-payload gives one JSON object per entry, the payload text exactly as sent."""
        payload = b'{\n  "text": "line one\\nline two",\n  "n": 1\n}'
        entry = numbered(5, payload=payload)
        write_wal(w0, [entry])

        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent), "--json", "--show-payload")

        [row] = result.json_lines()
        assert row["payload_id"] == entry.payload_id
        assert row["status"] == "pending"
        assert row["subject"] is None
        assert row["received_at"] == "2023-11-14T22:13:25.000+00:00"
        assert row["payload_size"] == len(payload)
        assert row["payload"] == payload.decode()
        assert row["wal_dir"] == "w0"

    def test_text_payload_stays_on_one_line(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """--show-payload in text escapes the payload's newlines, so each entry is one line."""
        write_wal(w0, [numbered(5, payload=b'{\n"a":\t1}')])

        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent), "--show-payload")

        assert result.out.count("\n") == 1
        assert result.out.rstrip("\n").split("\t")[-1] == '{\\n"a":\\t1}'

    def test_damage_is_warned_about_on_stderr(self, capsys: pytest.CaptureFixture[str], w0: Path) -> None:
        """inspect lists what it can read and warns on stderr about damaged runs it skipped."""
        made = [numbered(i) for i in range(3)]
        write_wal(w0, made)
        segment = only_segment(w0)
        flip_byte(segment, frames(segment)[0].offset + HEADER_SIZE)

        result = run_tool(capsys, "wal", "inspect", "--data-dir", str(w0.parent.parent))

        assert result.code == EXIT_OK
        assert self.listed(result) == ids(made[1:])
        assert "1 damaged runs skipped" in result.err


# -- wal dead-letters --------------------------------------------------------------


class TestDeadLetters:
    @pytest.fixture
    def stored(self, data_dir: Path) -> list[Entry]:
        """Two dead letters written through the service's DeadLetterStore; the second is being retried."""
        made = [numbered(1), numbered(2, source="app")]
        store = DeadLetterStore(data_dir / datadir.DEAD_LETTERS_FILENAME)
        try:
            store.record(made[0], "HTTP 400: bad row", 1)
            store.record(made[1], "constraint\nviolated", 5)
            assert store.set_retrying(made[1].payload_id)
        finally:
            store.close()
        return made

    def test_lists_rows_from_the_store(
        self, capsys: pytest.CaptureFixture[str], data_dir: Path, stored: list[Entry]
    ) -> None:
        """Each dead letter is one line: id, source, destination, attempts, failed_at, status, error."""
        result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir))

        assert result.code == EXIT_OK
        rows = [line.split("\t") for line in result.out.splitlines()]
        assert [(r[0], r[1], r[2], r[3], r[5], r[6]) for r in rows] == [
            (stored[0].payload_id, "web", "main", "1", "dead", "HTTP 400: bad row"),
            (stored[1].payload_id, "app", "main", "5", "retrying", "constraint\\nviolated"),
        ]
        assert rows[0][4].endswith("+00:00")

    def test_json_lines(self, capsys: pytest.CaptureFixture[str], data_dir: Path, stored: list[Entry]) -> None:
        """--json gives one object per dead letter, the error text exact."""
        result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir), "--json")

        rows = result.json_lines()
        assert [r["payload_id"] for r in rows] == ids(stored)
        assert rows[1]["error"] == "constraint\nviolated"
        assert rows[1]["attempts"] == 5
        assert rows[0]["payload_size"] == len(stored[0].payload)

    def test_limit(self, capsys: pytest.CaptureFixture[str], data_dir: Path, stored: list[Entry]) -> None:
        """--limit N prints the N oldest failures."""
        result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir), "--limit", "1")

        assert [line.split("\t")[0] for line in result.out.splitlines()] == [stored[0].payload_id]

    def test_reads_a_database_with_an_open_writer(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        """While a store has the file open (its -wal file exists), rows it committed are listed."""
        store = DeadLetterStore(data_dir / datadir.DEAD_LETTERS_FILENAME)
        try:
            store.record(numbered(7), "boom", 2)
            assert (data_dir / f"{datadir.DEAD_LETTERS_FILENAME}-wal").exists()

            result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir), "--json")
        finally:
            store.close()

        assert [r["payload_id"] for r in result.json_lines()] == [numbered(7).payload_id]

    def test_missing_file_exits_2(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        """A data directory without dead-letters.db is reported as an error."""
        result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir))

        assert result.code == EXIT_ERROR
        assert "no dead-letter file" in result.err

    def test_file_that_is_not_a_database_exits_2(self, capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
        """A corrupt dead-letters.db is an I/O error with SQLite's message, not a traceback."""
        (data_dir / datadir.DEAD_LETTERS_FILENAME).write_bytes(b"not a database at all" * 100)

        result = run_tool(capsys, "wal", "dead-letters", "--data-dir", str(data_dir))

        assert result.code == EXIT_ERROR
        assert "error:" in result.err
