"""GroupCommit: batches that arrive during a write share the next one, and keep their own outcome."""

from __future__ import annotations

from typing import TypeAlias

import gevent
import gevent.event
import pytest

from nexus_gevent.destinations._group_commit import GroupCommit
from nexus_gevent.entry import Entry
from nexus_gevent.errors import DestinationUnavailable, EntryRejected
from nexus_gevent.testing import make_entry


class GatedWriter:
    """Records every write; the first one waits for `release`, so others line up behind it."""

    def __init__(self, fail: set[str] | None = None, outage: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.release = gevent.event.Event()
        self.started = gevent.event.Event()
        self._fail = fail or set()
        self._outage = outage

    def __call__(self, entries: list[Entry]) -> None:
        ids = [e.payload_id for e in entries]
        self.calls.append(ids)
        self.started.set()
        self.release.wait()
        if self._outage:
            raise DestinationUnavailable("down")
        bad = self._fail.intersection(ids)
        if bad:
            raise EntryRejected(f"bad entry {sorted(bad)}")


#: Greenlet is not subscriptable at run time: the alias stays a string.
Writes: TypeAlias = "list[gevent.Greenlet[..., None]]"


def line_up(group_commit: GroupCommit, writer: GatedWriter, batches: list[list[str]]) -> Writes:
    """The first batch starts writing (and is held there); the others then wait behind it."""
    first = gevent.spawn(group_commit.write, [make_entry(i) for i in batches[0]])
    writer.started.wait(timeout=5)
    rest = [gevent.spawn(group_commit.write, [make_entry(i) for i in batch]) for batch in batches[1:]]
    gevent.sleep(0)  # one turn of the loop: each runs until it waits behind the write in progress
    return [first, *rest]


def spawn_writes(group_commit: GroupCommit, writer: GatedWriter, batches: list[list[str]]) -> Writes:
    """The first batch starts writing; the others arrive while it is in progress; all are let through."""
    greenlets = line_up(group_commit, writer, batches)
    writer.release.set()
    gevent.joinall(greenlets, timeout=5)
    assert all(g.ready() for g in greenlets)
    return greenlets


def test_batches_arriving_during_a_write_share_the_next_write() -> None:
    """Three batches that arrive while one is written go out together, in one call; every caller returns."""
    writer = GatedWriter()
    group_commit = GroupCommit(writer, DestinationUnavailable)

    greenlets = spawn_writes(group_commit, writer, [["a"], ["b"], ["c", "d"], ["e"]])

    assert writer.calls == [["a"], ["b", "c", "d", "e"]]
    assert all(g.successful() for g in greenlets)


def test_a_bad_entry_fails_only_its_own_batch() -> None:
    """When a combined write is refused, each batch is written alone and only the bad one's caller sees the error."""
    writer = GatedWriter(fail={"c"})
    group_commit = GroupCommit(writer, DestinationUnavailable)

    first, ok_before, bad, ok_after = spawn_writes(group_commit, writer, [["a"], ["b"], ["c"], ["d"]])

    assert writer.calls == [["a"], ["b", "c", "d"], ["b"], ["c"], ["d"]]
    assert [first.successful(), ok_before.successful(), ok_after.successful()] == [True, True, True]
    assert isinstance(bad.exception, EntryRejected)


def test_an_outage_fails_every_combined_batch_without_retrying_them_alone() -> None:
    """An outage during a combined write answers every batch with it, and nothing is written again."""
    writer = GatedWriter(outage=True)
    group_commit = GroupCommit(writer, DestinationUnavailable)

    greenlets = spawn_writes(group_commit, writer, [["a"], ["b"], ["c"]])

    assert writer.calls == [["a"], ["b", "c"]]
    assert all(isinstance(g.exception, DestinationUnavailable) for g in greenlets)


def test_a_caller_killed_while_waiting_does_not_stop_the_others() -> None:
    """A waiting caller that is killed (a drain out of time) leaves the write to go on for everyone else."""
    writer = GatedWriter()
    group_commit = GroupCommit(writer, DestinationUnavailable)
    first, doomed, survivor = line_up(group_commit, writer, [["a"], ["b"], ["c"]])

    doomed.kill()
    writer.release.set()
    gevent.joinall([first, survivor], timeout=5)

    assert [first.successful(), survivor.successful()] == [True, True]
    assert writer.calls == [["a"], ["b", "c"]]


def test_waiting_batches_are_answered_when_the_destination_closes() -> None:
    """fail_waiting answers every batch still in line, so no caller waits forever on a closed destination."""
    writer = GatedWriter()
    group_commit = GroupCommit(writer, DestinationUnavailable)
    first, waiting = line_up(group_commit, writer, [["a"], ["b"]])

    group_commit.fail_waiting(DestinationUnavailable("closed"))
    writer.release.set()
    gevent.joinall([first, waiting], timeout=5)

    assert first.successful()
    with pytest.raises(DestinationUnavailable):
        waiting.get()
    assert writer.calls == [["a"]]


def test_a_committer_killed_mid_write_answers_every_batch_and_the_next_write_goes_on() -> None:
    """Killed during a write, the committer answers the batch in flight and those behind it as an outage."""
    writer = GatedWriter()
    group_commit = GroupCommit(writer, DestinationUnavailable)
    in_flight, behind = line_up(group_commit, writer, [["a"], ["b"]])

    assert group_commit._committer is not None
    group_commit._committer.kill()
    gevent.joinall([in_flight, behind], timeout=5)

    assert isinstance(in_flight.exception, DestinationUnavailable)
    assert isinstance(behind.exception, DestinationUnavailable)
    # A later write starts a committer of its own and is stored.
    writer.release.set()
    group_commit.write([make_entry("c")])
    assert writer.calls[-1] == ["c"]
