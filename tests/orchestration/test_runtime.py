"""A process's engine state has one owner (orchestration.runtime): made in the process that uses
it, never inherited across a fork, and closed at shutdown, sending what it still held back. The
broker is the edge here: the held wake-ups' publisher is a list."""

from __future__ import annotations

import os

from orchestration import runtime
from orchestration.held import HeldMessages


def test_a_forked_child_never_uses_its_parents_runtime() -> None:
    parent = runtime.current()
    assert runtime.current() is parent  # one per process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it got, and leave without pytest's cleanup
        try:
            child = runtime.current()
            fresh = child is not parent and child.pid == os.getpid()
            own_store = child.store is not parent.store and child.held is not parent.held
            os.write(write, b"ok" if fresh and own_store else b"inherited")
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 100)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"ok"
    assert runtime.current() is parent  # the parent keeps its own


def test_closing_a_runtime_sends_what_it_held_and_a_new_one_replaces_it() -> None:
    sent: list[tuple[int, str, float]] = []
    first = runtime.install(runtime.Runtime(pools=["default"]))
    first.held = HeldMessages(sent.extend)
    first.held.hold([(1, "default"), (2, "research")], 60)
    second = runtime.install(runtime.Runtime())  # the first is closed on the way out
    assert sorted(step_id for step_id, _, _ in sent) == [1, 2]
    assert runtime.current() is second and second.pools == frozenset()
    runtime.close()
    assert runtime.current() is not second  # a process that closed its runtime gets a new one
    runtime.close()
