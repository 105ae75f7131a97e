"""A Celery worker's lifecycle, as the engine needs it: each pool process gets its own runtime
after fork, knowing the pools its worker consumes, and closes it (sending the wake-ups it was
holding back) when it stops. Connected when the app loads (``OrchestrationConfig.ready``)."""

from __future__ import annotations

from typing import Any

from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from orchestration import runtime

POOL_PREFIX = "pool."

#: The pools the worker consumes, learned in its main process before it forks its pool.
_pools: set[str] = set()


@celeryd_after_setup.connect
def _remember_pools(sender: Any, instance: Any, **kwargs: Any) -> None:
    queues = instance.app.amqp.queues.consume_from or {}
    _pools.clear()
    _pools.update(name[len(POOL_PREFIX) :] for name in queues if name.startswith(POOL_PREFIX))
    runtime.current().serve(_pools)  # a solo or threads pool runs steps in this process


@worker_process_init.connect
def _start_runtime(**kwargs: Any) -> None:
    runtime.install(runtime.Runtime(pools=_pools))


@worker_shutdown.connect
@worker_process_shutdown.connect
def _close_runtime(**kwargs: Any) -> None:
    runtime.close()
