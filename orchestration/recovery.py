"""The periodic safety net (Celery beat, every few seconds): one function per duty, each a
single pass that a test can call.

* leases that expired (the worker died) go back to the queue;
* queued steps whose wake-up message was lost, or never sent (a crash between commit and
  publish), are published again;
* approvals and event waits past their deadline take their declared outcome;
* runs past their deadline are stopped.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.verbs import Verb
from orchestration.engine import Tx, digest, node_of, publish_steps, run_lock, step_action
from orchestration.errors import Code, LimitExceeded, SignalboxError
from orchestration.models import (
    RUN_ACTIVE,
    Run,
    RunStatus,
    Step,
    StepStatus,
    Wait,
    WaitKind,
    WaitStatus,
)

log = logging.getLogger(__name__)

BATCH = 500


def reap_expired_leases() -> int:
    """Re-queue running steps whose lease expired. The next claim bumps the fencing token, so
    the lost worker can no longer commit."""
    now = timezone.now()
    reaped = 0
    for step_id, run_id in Step.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now).values_list(
        "id", "run_id"
    )[:BATCH]:
        with transaction.atomic():
            run = run_lock(run_id)
            step = Step.objects.get(pk=step_id)
            if step.status != StepStatus.RUNNING or step.lease_expires_at is None or step.lease_expires_at >= now:
                continue
            tx = Tx(run, now)
            tx.record(Verb.STEP_LEASE_EXPIRED, "step", step.pk, step=step, worker=step.lease_owner, attempt=step.attempt)
            # A lost worker counts as a failed attempt, so a step that kills its worker every
            # time (or can never commit) is stopped by max_attempts instead of looping.
            failures = step.failures + 1
            attempts_log = [*step.attempts_log, {
                "attempt": step.attempt, "agent": step.agent, "class": "transient", "code": Code.LEASE_EXPIRED,
                "message": f"worker {step.lease_owner} stopped renewing its lease", "at": now.isoformat(),
            }]
            if failures >= step.max_attempts:
                step.failures, step.attempts_log = failures, attempts_log
                Step.objects.filter(pk=step.pk).update(failures=failures, attempts_log=attempts_log)
                tx.step_exhausted(step, LimitExceeded(
                    f"gave up after {failures} attempts (max_attempts {step.max_attempts}); the last worker was lost",
                    code=Code.MAX_ATTEMPTS, detail={"bound": "max_attempts", "limit": step.max_attempts, "last_error": "lease_expired"},
                ))
            else:
                tx.move(step, StepStatus.QUEUED, lease_owner="", lease_expires_at=None, available_at=now,
                        published_at=now, failures=failures, attempts_log=attempts_log)
                tx.publish.append((step, 0.0))
            tx.flush()
            reaped += 1
    return reaped


def republish_queued() -> int:
    """Publish again the queued steps that are due and whose message has not led to a claim."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.SIGNALBOX["REPUBLISH_AFTER_SECONDS"])
    due = list(
        Step.objects.filter(status=StepStatus.QUEUED, available_at__lte=now)
        .filter(Q(published_at__isnull=True) | Q(published_at__lt=stale))
        .values_list("id", "pool")[:BATCH]
    )
    if not due:
        return 0
    Step.objects.filter(pk__in=[d[0] for d in due], status=StepStatus.QUEUED).update(published_at=now)
    publish_steps([(step_id, pool, 0.0) for step_id, pool in due])
    return len(due)


def expire_waits() -> int:
    """Apply the declared outcome to approvals and event waits whose deadline passed."""
    now = timezone.now()
    expired = 0
    for wait_id, run_id in Wait.objects.filter(status=WaitStatus.OPEN, deadline_at__lt=now).values_list(
        "id", "run_id"
    )[:BATCH]:
        with transaction.atomic():
            run = run_lock(run_id)
            if not Wait.objects.filter(pk=wait_id, status=WaitStatus.OPEN).update(
                status=WaitStatus.EXPIRED, decided_at=now
            ):
                continue
            wait = Wait.objects.select_related("step").get(pk=wait_id)
            tx = Tx(run, now)
            tx.record(Verb.WAIT_EXPIRED, "wait", wait.pk, step=wait.step, outcome=wait.on_timeout, kind=wait.kind)
            try:
                _apply_timeout(tx, wait)
            except SignalboxError as exc:
                tx.fail_run(exc.code, exc.message)
            tx.flush()
            expired += 1
    return expired


def _apply_timeout(tx: Tx, wait: Wait) -> None:
    step = wait.step
    node = node_of(tx.wf, step)
    outcome = wait.on_timeout
    if wait.kind == WaitKind.ESCALATION:
        # Nobody answered: the step fails for good (an unanswered compensation ends the run's
        # compensations, which the run's error then says).
        tx.fail_step(step, LimitExceeded(
            f"escalation {wait.pk} expired unanswered", code=Code.ESCALATION_EXPIRED,
            detail={"bound": "escalation_timeout", "escalation": wait.pk},
        ))
        return
    if wait.kind == WaitKind.APPROVAL:
        if outcome == "approve":
            approved = digest(step_action(step, node, tx.run))
            tx.move(step, StepStatus.QUEUED, approved_digest=approved, available_at=tx.now, published_at=tx.now)
            tx.publish.append((step, 0.0))
            return
        tx.fail_step(step, SignalboxError(f"approval {wait.pk} expired unanswered (fails closed)", code=Code.APPROVAL_EXPIRED))
        return
    # An event wait: fail, continue to the successors, or take a declared node.
    if outcome in ("__fail__", "fail"):
        tx.fail_step(step, SignalboxError(f"no {wait.name!r} event before the deadline", code=Code.WAIT_TIMEOUT))
        return
    timed_out: dict[str, Any] = {"timed_out": True, "event": wait.name}
    tx.move(step, StepStatus.SUCCEEDED, output=timed_out, finished_at=tx.now)
    tx.record(Verb.STEP_SUCCEEDED, "step", step.pk, step=step, payload=timed_out, timed_out=True)
    if outcome == "continue":
        for key in node.writes:
            tx.write_state(key, timed_out, writer=f"timeout:{wait.name}", step=step)
        tx.successors(step, node, timed_out)
    elif outcome != "__end__":
        tx.activate(outcome)


def enforce_run_deadlines() -> int:
    """Stop active runs that passed their max_duration. A run that is compensating is left to
    finish undoing: its compensations are bounded by their attempts and escalations."""
    now = timezone.now()
    stopped = 0
    active = [s for s in RUN_ACTIVE if s != RunStatus.COMPENSATING]
    for run_id in Run.objects.filter(status__in=active, deadline_at__lt=now).values_list("id", flat=True)[:BATCH]:
        with transaction.atomic():
            run = run_lock(run_id)
            if run.is_terminal or run.status == RunStatus.COMPENSATING:
                continue
            tx = Tx(run, now)
            tx.record(Verb.RUN_LIMIT_HIT, "run", run.pk, bound="max_duration", limit=str(tx.wf.max_duration))
            tx.fail_run("run_deadline", f"run stopped by its max_duration bound ({tx.wf.max_duration})")
            tx.flush()
            stopped += 1
    return stopped


def engine_tick() -> dict[str, int]:
    """One pass of every duty; what beat runs every few seconds."""
    return {
        "reaped": reap_expired_leases(),
        "expired_waits": expire_waits(),
        "deadlines": enforce_run_deadlines(),
        "republished": republish_queued(),
    }
