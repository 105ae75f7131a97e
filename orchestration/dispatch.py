"""The outbox: what a committed change sends, after its commit and never before.

Wake-ups go first (a worker waiting for a step matters more than a page), then held hand-offs
(wake-ups of steps this worker will likely claim itself, published only if it does not in
time), then live events. Sending never raises into the caller: a change that committed is done,
whatever the broker says. A wake-up that cannot be sent (Redis down) leaves its step queued
with no record of a message, so the reaper's next pass sends it again once the broker is back;
a lost live event is only a missed hint (the pages read PostgreSQL).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction

from infra.broker import task_publisher
from orchestration.changes import Changes
from orchestration.models import Step, StepKind
from orchestration.runtime import Runtime

log = logging.getLogger(__name__)

#: The Celery task that claims and runs a step (``orchestration.tasks.step_execute``), by name:
#: the outbox does not import the task module, which sits above it.
STEP_TASK = "orchestration.tasks.step_execute"


def queue_name(pool: str) -> str:
    return f"pool.{pool}"


def send(changes: Changes, rt: Runtime) -> None:
    """Send what ``changes`` (committed) want sent. Never raises."""
    if changes.wakeups:
        publish(
            [(w.step.pk, w.step.pool, w.delay) for w in changes.wakeups],
            rt,
            hints={w.step.pk: hint for w in changes.wakeups if (hint := wake_hint(w.step))},
        )
    if changes.held:
        held = [(w.step.pk, w.step.pool) for w in changes.held]
        seconds = settings.SIGNALBOX["HANDOFF_HOLD_SECONDS"]
        if seconds > 0:
            rt.held.hold(held, seconds, publish=lambda steps: publish(steps, rt))
        else:
            publish([(step_id, pool, 0.0) for step_id, pool in held], rt)
    if changes.live:
        rt.live.send(changes.live_events())


def send_on_commit(changes: Changes, rt: Runtime) -> None:
    """Send once the current transaction commits (at once outside a transaction)."""
    transaction.on_commit(lambda: send(changes, rt))


def wake_hint(step: Step) -> list[Any] | None:
    """What a worker needs to reserve for an agent step's call in the transaction that claims
    it, before it has read the step (``orchestration.worker.costs.hold_for_hint``): its kind,
    agent, node, run, tenant and workflow, none of which a step ever changes. None for a step of
    another kind, or whose run is not at hand (a message without it costs a transaction more
    under a cost ceiling, nothing else)."""
    if step.kind not in (StepKind.AGENT, StepKind.ITEM) or not _RUN.is_cached(step):
        return None
    return hint_of(step)


def hint_of(step: Step) -> list[Any]:
    """:func:`wake_hint`'s values, read from ``step`` and its run (which it may load)."""
    run = step.run
    return [
        step.kind,
        step.agent,
        step.node,
        run.pk,
        run.tenant_id,
        run.workflow_name,
        run.workflow_version,
    ]


_RUN = Step._meta.get_field("run")


def publish(
    steps: Sequence[tuple[int, str, float]],
    rt: Runtime,
    *,
    hints: Mapping[int, list[Any]] | None = None,
) -> None:
    """Send the wake-up message of each (step id, pool, delay) to its pool's queue, with its
    step's hint (:func:`wake_hint`) where ``hints`` has one. A message that cannot be sent is
    logged and its step marked as never woken, for the reaper."""
    from celery import current_app

    unsent: list[int] = []
    try:
        task = current_app.tasks[STEP_TASK]
        publisher = task_publisher(task.app)
        fast = publisher.usable(task)
    except Exception:
        log.warning(
            "no broker to wake workers for steps %s", [s for s, _, _ in steps], exc_info=True
        )
        _mark_unsent(rt, [s for s, _, _ in steps])
        return
    for step_id, pool, delay in steps:
        hint = hints.get(step_id) if hints else None
        args: list[Any] = [step_id] if hint is None else [step_id, hint]
        try:
            if delay > 0:
                task.apply_async(args=args, queue=queue_name(pool), countdown=delay)
                continue
            if fast:
                publisher.publish(task, args, queue_name(pool))
            else:
                task.apply_async(args=args, queue=queue_name(pool))
        except Exception:
            unsent.append(step_id)
    if unsent:
        log.warning(
            "waking workers for steps %s failed; the reaper sends them again", unsent, exc_info=True
        )
        _mark_unsent(rt, unsent)


def _mark_unsent(rt: Runtime, step_ids: list[int]) -> None:
    try:
        rt.store.mark_sent(step_ids, None)
    except Exception:  # the database is gone too: the reaper finds them by their age instead
        log.warning("could not mark steps %s as not woken", step_ids, exc_info=True)
