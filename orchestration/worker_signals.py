"""Which pools this worker process serves, learned from Celery when the worker starts.

A worker runs a ready successor itself (no broker hop) only when it consumes that step's pool.
"""

from __future__ import annotations

from typing import Any

from celery.signals import celeryd_after_setup, worker_process_shutdown, worker_shutdown

POOL_PREFIX = "pool."

#: Pools this process consumes; empty outside a worker (the web process never runs steps).
worker_pools: set[str] = set()


@celeryd_after_setup.connect
def _remember_pools(sender: Any, instance: Any, **kwargs: Any) -> None:
    queues = instance.app.amqp.queues.consume_from or {}
    worker_pools.clear()
    worker_pools.update(name[len(POOL_PREFIX):] for name in queues if name.startswith(POOL_PREFIX))


def serve_pools(pools: set[str] | list[str]) -> None:
    """Set the served pools explicitly (embedded mode's in-process worker)."""
    worker_pools.clear()
    worker_pools.update(pools)


@worker_shutdown.connect
@worker_process_shutdown.connect
def _send_held_messages(**kwargs: Any) -> None:
    """A stopping worker publishes the wake-ups it was holding (orchestration.handoff) rather
    than leave those steps to the reaper."""
    from orchestration.handoff import held_messages

    held_messages.flush()
