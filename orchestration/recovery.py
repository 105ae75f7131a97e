"""The periodic safety net (Celery beat, every few seconds): one function per duty, each a
single pass that a test can call.

* leases that expired (the worker died) go back to the queue, and the cost reservations their
  attempts held are released;
* queued steps whose wake-up message was lost, never sent, or failed (a broker outage) are
  published again;
* approvals, escalations and event waits past their deadline take their declared outcome;
* runs past their deadline are stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from orchestration import advance, dispatch, runtime
from orchestration.changes import DONE_STEPS, OPEN_WAITS, TOOL_CALLS, Changes, Snapshot
from orchestration.commit import compute_locked, write_and_send
from orchestration.models import RUN_ACTIVE, RunStatus, StepStatus, Wait, WaitStatus
from policies.ledger import reservations_release_expired, reservations_release_for_step

log = logging.getLogger(__name__)

BATCH = 500


class _Skip(Exception):
    """Someone else got there first: nothing to do for this row."""


def reap_expired_leases() -> int:
    """Re-queue running steps whose lease expired and release their attempts' reservations.
    The next claim bumps the fencing token, so the lost worker can no longer commit."""
    rt = runtime.current()
    now = timezone.now()
    reaped = 0
    for step_id, run_id in rt.store.leases_expired(now, BATCH):
        owners: list[str] = []

        def compute(snapshot: Snapshot, owners: list[str] = owners) -> Changes:
            step = snapshot.focus
            assert step is not None
            if (
                step.status != StepStatus.RUNNING
                or step.lease_expires_at is None
                or step.lease_expires_at >= now
            ):
                raise _Skip
            owners.append(step.lease_owner or "")
            return advance.lease_expired(snapshot, now, step=step)

        try:
            with transaction.atomic():
                changes = compute_locked(rt, run_id, compute, needs={TOOL_CALLS}, focus_id=step_id)
                # The lost attempt's cost reservation goes back with its lease (and the budget
                # block its worker held for the run): the retry reserves its own.
                reservations_release_for_step(
                    step_id, now=now, run_id=run_id, owner=owners[-1] if owners else ""
                )
                write_and_send(rt, changes)
        except _Skip:
            continue
        reaped += 1
    return reaped


def republish_queued() -> int:
    """Publish again the queued steps that are due and whose message has not led to a claim."""
    rt = runtime.current()
    now = timezone.now()
    stale = now - timedelta(seconds=settings.SIGNALBOX["REPUBLISH_AFTER_SECONDS"])
    due = rt.store.queued_unsent(now, stale, BATCH)
    if not due:
        return 0
    rt.store.mark_sent([step_id for step_id, _ in due], now)
    dispatch.publish([(step_id, pool, 0.0) for step_id, pool in due], rt)
    return len(due)


def expire_waits() -> int:
    """Apply the declared outcome to approvals, escalations and event waits whose deadline passed."""
    rt = runtime.current()
    now = timezone.now()
    expired = 0
    for wait_id, run_id in rt.store.waits_expired(now, BATCH):
        try:
            with transaction.atomic():
                rt.store.run_get(run_id, lock=True)
                if not rt.store.wait_close(wait_id, status=WaitStatus.EXPIRED, decided_at=now):
                    raise _Skip
                wait = rt.store.wait_get(wait_id)
                assert wait is not None
                wait.status, wait.decided_at = WaitStatus.EXPIRED, now
                write_and_send(
                    rt, compute_locked(rt, run_id, _expired(wait, now), focus_id=wait.step_id)
                )
        except _Skip:
            continue
        expired += 1
    return expired


def _expired(wait: Wait, now: datetime) -> Callable[[Snapshot], Changes]:
    def compute(snapshot: Snapshot) -> Changes:
        assert snapshot.focus is not None
        wait.step = snapshot.focus
        return advance.wait_expired(snapshot, now, wait=wait)

    return compute


def enforce_run_deadlines() -> int:
    """Stop active runs that passed their max_duration. A run that is compensating is left to
    finish undoing: its compensations are bounded by their attempts and escalations."""
    rt = runtime.current()
    now = timezone.now()
    stopped = 0
    active = [s for s in RUN_ACTIVE if s != RunStatus.COMPENSATING]
    for run_id in rt.store.runs_overdue(now, active, BATCH):

        def compute(snapshot: Snapshot) -> Changes:
            if snapshot.run.is_terminal or snapshot.run.status == RunStatus.COMPENSATING:
                raise _Skip
            return advance.run_past_deadline(snapshot, now)

        try:
            with transaction.atomic():
                write_and_send(
                    rt,
                    compute_locked(
                        rt, run_id, compute, needs={OPEN_WAITS, DONE_STEPS, "active_steps"}
                    ),
                )
        except _Skip:
            continue
        stopped += 1
    return stopped


def engine_tick() -> dict[str, int]:
    """One pass of every duty; what beat runs every few seconds."""
    return {
        "reaped": reap_expired_leases(),
        "expired_waits": expire_waits(),
        "deadlines": enforce_run_deadlines(),
        "republished": republish_queued(),
        "reservations_released": reservations_release_expired(),
    }
