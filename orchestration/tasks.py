"""Celery tasks: thin shells that call the engine. A message is only a wake-up call."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import close_old_connections

from orchestration import recovery, runtime, services
from orchestration.worker.execute import step_execute as execute
from orchestration.worker.execute import worker_identity


@shared_task(name="orchestration.tasks.step_execute", ignore_result=True)
def step_execute(step_id: int, hint: list[Any] | None = None) -> int:
    """Claim and run a step (and the successors this worker claims locally). ``hint``: what
    the step's reservation needs, so it is made with the claim (``dispatch.wake_hint``)."""
    close_old_connections()  # drop a connection that broke or expired since the last task
    return execute(step_id, rt=runtime.current(), worker_id=worker_identity(), hint=hint)


@shared_task(name="orchestration.tasks.engine_tick", ignore_result=True)
def engine_tick() -> dict[str, int]:
    return {**recovery.engine_tick(), "sla_escalated": len(services.waits_escalate_breached())}
