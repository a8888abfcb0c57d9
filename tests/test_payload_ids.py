"""Payload ids: 32 lowercase hex digits, unique, in time order, and never shared with a forked child."""

from __future__ import annotations

import os
import re
import time

from nexus_gevent.entry import new_payload_id

#: The API's pattern for a payload_id (docs/openapi.yaml).
PAYLOAD_ID = re.compile(r"[0-9a-f]{32}")


def test_ids_match_the_documented_pattern_and_never_repeat() -> None:
    """Ten thousand ids are all 32 lowercase hex digits, and all different."""
    ids = [new_payload_id() for _ in range(10_000)]

    assert all(PAYLOAD_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_an_id_made_in_a_later_millisecond_sorts_after() -> None:
    """Ids start with the time: one made after the clock moved on sorts after every earlier one."""
    earlier = [new_payload_id() for _ in range(100)]
    started = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == started:
        pass  # until the next millisecond

    later = new_payload_id()

    assert all(later > e for e in earlier)


def test_a_forked_child_makes_ids_of_its_own() -> None:
    """A child forked after the parent drew its random parts does not make the parent's next ids."""
    new_payload_id()  # the parent now holds random parts it has not used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        os.write(write, "".join(new_payload_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = {new_payload_id()[12:] for _ in range(10)}

    assert {child[i + 12 : i + 32] for i in range(0, len(child), 32)}.isdisjoint(parent)
