"""Celery tasks: thin shells that call the engine. A message is only a wake-up call."""

from __future__ import annotations

from celery import shared_task
from django.db import close_old_connections

from orchestration import recovery
from orchestration.executor import step_execute as execute
from orchestration.executor import worker_identity
from orchestration.worker_signals import worker_pools


@shared_task(name="orchestration.tasks.step_execute", ignore_result=True)
def step_execute(step_id: int) -> int:
    """Claim and run a step (and the successors this worker claims locally)."""
    close_old_connections()  # drop a connection that broke or expired since the last task
    return execute(step_id, worker_id=worker_identity(), pools=frozenset(worker_pools))


@shared_task(name="orchestration.tasks.engine_tick", ignore_result=True)
def engine_tick() -> dict[str, int]:
    return recovery.engine_tick()
