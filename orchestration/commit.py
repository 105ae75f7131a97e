"""One advance of a run as one transaction: lock the run row, load what the decision needs,
compute it (``orchestration.advance``), write it in one store call, and send its messages after
commit (``orchestration.dispatch``). Services, the reaper and a worker's slow paths all go
through here; a worker's common completion goes without the lock (``worker.complete``)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from django.db import transaction

from orchestration import dispatch
from orchestration.changes import Changes, Missing, Snapshot
from orchestration.models import Run, Step
from orchestration.runtime import Runtime

#: Computes the changes of an advance from what was loaded (run locked, focus step read).
Compute = Callable[[Snapshot], Changes]


def compute_locked(
    rt: Runtime,
    run_id: int,
    compute: Compute,
    *,
    needs: Collection[str] = (),
    focus_id: int | None = None,
    focus: Step | None = None,
    locked: Run | None = None,
) -> Changes:
    """Inside the caller's transaction: lock the run, read the focus step (``focus_id``; or use
    ``focus``, an object the caller holds), load ``needs`` and
    compute; if the computation asks for more, load it and compute again from fresh rows.
    ``locked`` is the run as the caller read it when it locked it in this transaction (not
    read again the first time). Raises ``Run.DoesNotExist`` for an unknown run."""
    store = rt.store
    wanted = frozenset(needs)
    while True:
        run, locked = locked or store.run_get(run_id, lock=True), None
        if focus_id is not None:
            focus = store.step_get(focus_id)
        try:
            return compute(store.snapshot(run, wanted, focus=focus))
        except Missing as missing:
            wanted |= missing.needs


def advance_locked(
    rt: Runtime,
    run_id: int,
    compute: Compute,
    *,
    needs: Collection[str] = (),
    focus_id: int | None = None,
    focus: Step | None = None,
) -> Changes:
    """:func:`compute_locked`, written and committed as one transaction; its messages go out
    after commit."""
    with transaction.atomic():
        changes = compute_locked(rt, run_id, compute, needs=needs, focus_id=focus_id, focus=focus)
        rt.store.write(changes)
        dispatch.send_on_commit(changes, rt)
    return changes


def write_and_send(rt: Runtime, changes: Changes) -> None:
    """Inside the caller's transaction: write ``changes``; send their messages after commit."""
    rt.store.write(changes)
    dispatch.send_on_commit(changes, rt)


def write_many_and_send(rt: Runtime, many: Sequence[Changes]) -> None:
    """Inside the caller's transaction: write several advances' ``many`` changes in one store
    call (one round trip on PostgreSQL); send their messages after commit."""
    rt.store.write_many(many)
    for changes in many:
        dispatch.send_on_commit(changes, rt)


__all__ = ["Run", "advance_locked", "compute_locked", "write_and_send", "write_many_and_send"]
