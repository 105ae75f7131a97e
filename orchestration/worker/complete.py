"""Committing an attempt's outcome and advancing its run: load what the decision needs, compute
it (``orchestration.advance``), write it in one store call, send its messages after commit.

A success goes, on a store that can (PostgreSQL), without locking the run row: the run row read
at claim time is used, and the write checks its version and the step's fence in the same round
trip; if another transaction wrote the run meanwhile, it is read again and the advance
recomputed. Elsewhere (SQLite, a caller's transaction, repeated conflicts) the run row is locked
first. Failures, stale approvals and hard timeouts always lock: they are not the hot path.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from orchestration import advance, dispatch
from orchestration.changes import (
    ACTIVE_STEPS,
    MAP_PROGRESS,
    TOOL_CALLS,
    Changes,
    Fence,
    Missing,
    Snapshot,
)
from orchestration.commit import advance_locked
from orchestration.errors import Code, SignalboxError, StepTimeout, TransientError
from orchestration.failures import retry_delay
from orchestration.ledger_calls import block_call_value
from orchestration.models import Run, Step, StepKind, StepStatus
from orchestration.runtime import Runtime
from orchestration.store import LeaseLost, RunChanged
from orchestration.worker.chain import Chain, Completion, Member, claim_events, settle_apart
from policies.ledger import settlement_entries

log = logging.getLogger(__name__)

#: Optimistic completions retried with fresh run data before falling back to the row lock.
OPTIMISTIC_TRIES = 4


def predicted_needs(step: Step) -> frozenset[str]:
    """What a step's completion will read, known before computing it: a map item needs its map's
    progress; a compensation needs the run's pending compensations. The rest usually needs
    nothing (a need found while computing is loaded then, and the advance computed again)."""
    if step.kind == StepKind.ITEM:
        return frozenset({MAP_PROGRESS})
    if step.kind == StepKind.COMPENSATE:
        return frozenset({ACTIVE_STEPS})
    return frozenset()


def _fence_values(done: Completion) -> dict[str, Any]:
    step = done.step
    values: dict[str, Any] = {
        "status": StepStatus.SUCCEEDED,
        "input": step.input,
        "output": done.output,
        "usage": done.usage,
        "finished_at": done.now,
        "lease_owner": "",
        "lease_expires_at": None,
    }
    if done.degraded:
        values["degraded"] = step.degraded = done.degraded
    settlement = done.settlement
    if settlement is not None and settlement.block:
        # A call made from a budget block: recorded on the step row this statement writes
        # anyway, not as a row of its own (``orchestration.ledger_calls``).
        values["block_call"] = block_call_value(settlement)
    return values


def _compute(
    snapshot: Snapshot,
    done: Completion,
    rt: Runtime,
    worker_id: str,
    fence: Fence,
    *,
    optimistic: bool,
    hold: bool,
) -> Changes:
    changes = advance.step_completed(
        snapshot,
        done.now,
        step=done.step,
        output=done.output,
        written=done.written,
        worker_id=worker_id,
        pools=rt.pools,
        tool_calls=done.tool_calls,
        tool_entries=done.tool_entries,
        tool_decisions=done.decisions,
        hold_handoffs=hold,
        lease_seconds=rt.lease_seconds,
        optimistic=optimistic,
        fence=fence,
    )
    if done.settlement is not None:
        if not done.settlement.block:  # a block's call is on the step row (the fence's values)
            changes.settlements.append(done.settlement)
        changes.audit.extend(settlement_entries(done.settlement))
    return changes


def step_complete(
    done: Completion,
    *,
    rt: Runtime,
    worker_id: str,
    chain: Chain | None = None,
    handed_off: list[Step] | None = None,
    run: Run | None = None,
) -> Step | None:
    """Commit a successful attempt and advance its run in one transaction, fenced by the
    attempt's token and owner; returns the step this worker claimed for itself, if any. With a
    ``chain``, the commit may still be in flight when this returns (``Chain.send``). The first
    of ``handed_off`` (default: the chain's) is claimed in the same transaction when the
    completion makes nothing ready for this worker."""
    if handed_off is None and chain is not None:
        handed_off = chain.handed_off
    step, now = done.step, done.now
    store = rt.store
    values = _fence_values(done)
    needs = predicted_needs(step)
    run = run or step.run
    if store.optimistic and not connection.in_atomic_block:
        for _ in range(OPTIMISTIC_TRIES):
            group = (
                chain.open
                if chain is not None and chain.open is not None and chain.open.ahead is step
                else None
            )
            if group is not None and needs:
                # Joining a batch not sent yet, a read would not see that batch's writes: it
                # goes first (with this step's claim), and this completion on its own.
                assert chain is not None
                chain.settle(step)
                group, run = None, store.run_get(step.run_id)
            if group is not None:
                # Started before its sibling's completion was sent: claimed and completed in
                # one statement of that same transaction.
                fence = Fence(
                    step.pk,
                    step.attempt,
                    worker_id,
                    {**values, "attempt": step.attempt, "started_at": step.started_at},
                    claims=True,
                )
            else:
                fence = Fence(step.pk, step.attempt, worker_id, values)
            try:
                snapshot = store.snapshot(run, needs, focus=step)
                changes = _compute(
                    snapshot,
                    done,
                    rt,
                    worker_id,
                    fence,
                    optimistic=True,
                    hold=handed_off is not None,
                )
            except Missing as missing:
                needs |= missing.needs
                if group is not None:
                    assert chain is not None
                    chain.settle(step)
                run = store.run_get(step.run_id)
                continue
            batch = store.batch()
            batch.add(changes)
            members: list[Member] = [(done, changes, None)]
            if group is not None:
                assert chain is not None
                chain.open = None
                group.batch.extend(batch)
                batch, members = group.batch, [*group.members, (done, changes, group.sibling)]
            elif chain is not None:
                # The previous completion must be in before this one goes out; it also brings
                # the list of handed-off siblings up to date.
                chain.settle(step)
            # This worker's chain ends here: the sibling it handed to the broker first is
            # claimed in this same transaction if nobody has taken it (instead of a claim
            # transaction of its own right after), or, if it is pure, runs first and joins
            # this transaction with its own completion.
            sibling = (
                handed_off[0]
                if handed_off and changes.local_step is None and not changes.run.is_terminal
                else None
            )
            if (
                chain is not None
                and sibling is not None
                and chain.may_join(sibling, changes.run, now)
            ):
                return chain.hold(batch, members, sibling, now)
            if sibling is not None:
                batch.claim_last(
                    sibling.pk, worker_id, now, now + timedelta(seconds=rt.lease_seconds)
                )
            if chain is not None:
                # The step this batch claims for the worker reserves in it too: no round trip
                # of its own (and none to wait for before a pure agent starts).
                claimed = changes.local_step or sibling
                settling = [d.settlement for d, _, _ in members if d.settlement is not None]
                if claimed is None or claimed.run_id != step.run_id:
                    # The chain goes no further in this run: its budget block is settled here.
                    settling.extend(chain.leave_run(batch, step.run_id, now))
                if claimed is not None:
                    chain.ask_hold(
                        batch, claimed, settling, now, inserted=claimed is changes.local_step
                    )
                if sibling is None:
                    chain.ask_hold_queued(batch, changes, settling, now)
                return chain.send(batch, members, sibling)
            try:
                rows = batch.run().result()
            except RunChanged:
                run = store.run_get(step.run_id)
                continue
            except LeaseLost:
                log.warning(
                    "step %s lost its lease (token %s); its result is discarded",
                    step.pk,
                    step.attempt,
                )
                settle_apart(done)
                return None
            if sibling is not None:
                assert handed_off is not None
                handed_off.remove(sibling)
                rt.held.release(sibling.pk)
                changes.local_step = batch.claimed_step(rows, now)
                if changes.local_step is not None:  # one live message for the whole transaction
                    changes.live.extend(claim_events(changes.local_step, now))
            dispatch.send(changes, rt)
            _note_handoff(rt, changes, handed_off)
            return changes.local_step
    if chain is not None:
        chain.settle(step)
    fence = Fence(step.pk, step.attempt, worker_id, values)
    return _complete_locked(done, rt, worker_id, fence, needs, handed_off)


def _note_handoff(rt: Runtime, changes: Changes, handed_off: list[Step] | None) -> None:
    """Keep the steps ``changes`` handed off in this worker's pools, to claim at the end."""
    if handed_off is not None:
        handed_off.extend(s for s in changes.handed_off() if s.pool in rt.pools)


def _complete_locked(
    done: Completion,
    rt: Runtime,
    worker_id: str,
    fence: Fence,
    needs: frozenset[str],
    handed_off: list[Step] | None,
) -> Step | None:
    step = done.step

    def compute(snapshot: Snapshot) -> Changes:
        hold = handed_off is not None
        return _compute(snapshot, done, rt, worker_id, fence, optimistic=False, hold=hold)

    try:
        changes = advance_locked(rt, step.run_id, compute, needs=needs, focus=step)
    except LeaseLost:
        log.warning(
            "step %s lost its lease (token %s); its result is discarded", step.pk, step.attempt
        )
        settle_apart(done)
        return None
    _note_handoff(rt, changes, handed_off)
    return changes.local_step


def recommit(
    done: Completion, run: Run | None, *, rt: Runtime, worker_id: str, chain: Chain
) -> Step | None:
    """Commit a completion again from scratch (its batch did not go through), on its own: what
    it makes ready is not started early this time."""
    return step_complete(done, rt=rt, worker_id=worker_id, handed_off=chain.handed_off, run=run)


def commit_failed(done: Completion, exc: BaseException, *, rt: Runtime, worker_id: str) -> None:
    """Committing a successful attempt failed (the database is gone, a bug): the attempt is
    recorded as a transient failure, so it is retried, then bounded by its limits."""
    log.error("committing step %s failed", done.step.pk, exc_info=exc)
    close_old_connections()
    settle_apart(done)
    attempt_fail(
        done.step,
        TransientError(f"committing the result failed: {exc!r}", code=Code.COMMIT_FAILED),
        rt=rt,
        worker_id=worker_id,
        records=(done.tool_calls, done.tool_entries, done.decisions),
    )


def attempt_fail(
    step: Step,
    error: SignalboxError,
    *,
    rt: Runtime,
    worker_id: str,
    payload: Any = None,
    records: tuple[list[Any], list[Any], list[Any]] | None = None,
) -> None:
    """Commit a failed attempt: retry a transient error with backoff, otherwise hand the step to
    the next recovery tier. Nothing is written if the attempt no longer holds the step."""
    now = timezone.now()
    tool_calls, tool_entries, decisions = records if records is not None else ([], [], [])
    delay = retry_delay(
        step.failures + 1,
        base=settings.SIGNALBOX["RETRY_BASE_SECONDS"],
        cap=settings.SIGNALBOX["RETRY_MAX_SECONDS"],
    )
    attempt_input = step.input

    def compute(snapshot: Snapshot) -> Changes:
        current = snapshot.focus
        assert current is not None
        if current.status != StepStatus.RUNNING or (current.attempt, current.lease_owner) != (
            step.attempt,
            worker_id,
        ):
            raise _LeaseGone
        return advance.attempt_failed(
            snapshot,
            now,
            step=current,
            attempt_input=attempt_input,
            error=error,
            worker_id=worker_id,
            tool_calls=tool_calls,
            tool_entries=tool_entries,
            tool_decisions=decisions,
            payload=payload,
            delay=delay,
        )

    try:
        advance_locked(rt, step.run_id, compute, needs=frozenset({TOOL_CALLS}), focus_id=step.pk)
    except _LeaseGone:
        log.warning("step %s lost its lease before recording %s", step.pk, error.code)


class _LeaseGone(Exception):
    """The attempt no longer holds its step: what it would record is dropped."""


def approval_reopen(step: Step, action: dict[str, Any], *, rt: Runtime, worker_id: str) -> None:
    """What would execute differs from what was approved (or nothing was): ask again."""
    now = timezone.now()

    def compute(snapshot: Snapshot) -> Changes:
        current = snapshot.focus
        assert current is not None
        if current.status != StepStatus.RUNNING or (current.attempt, current.lease_owner) != (
            step.attempt,
            worker_id,
        ):
            raise _LeaseGone
        return advance.approval_reopened(
            snapshot, now, step=current, action=action, worker_id=worker_id
        )

    try:
        advance_locked(rt, step.run_id, compute, focus_id=step.pk)
    except _LeaseGone:
        return


def hard_timeout(step_id: int, token: int, owner: str, *, rt: Runtime) -> None:
    """An attempt passed its hard timeout: fail it (as transient) and fence it off, so whatever
    it returns later is discarded."""
    step = rt.store.running_step(step_id, token)
    if step is None:
        return
    attempt_fail(
        step,
        StepTimeout(
            "the step passed its hard timeout and was abandoned", code=Code.STEP_HARD_TIMEOUT
        ),
        rt=rt,
        worker_id=owner,
    )
