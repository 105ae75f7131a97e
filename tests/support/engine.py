"""The engine's worker entry points as tests call them: with a runtime per set of pools (one
per test process), the way a worker process holds one."""

from __future__ import annotations

from typing import Any

from orchestration.runtime import Runtime
from orchestration.worker import attempt, execute

_runtimes: dict[frozenset[str], Runtime] = {}


def runtime_for(pools: frozenset[str]) -> Runtime:
    if pools not in _runtimes:
        _runtimes[pools] = Runtime(pools=pools)
    return _runtimes[pools]


def runtimes_forget_settlements() -> None:
    """Drop the budget-block settlements the in-process runtimes still hold (a test's rows are
    gone with it)."""
    for rt in _runtimes.values():
        rt.settling.take(1)


def step_execute(step_id: int, *, worker_id: str, pools: frozenset[str] = frozenset()) -> int:
    return execute.step_execute(step_id, rt=runtime_for(pools), worker_id=worker_id)


def step_claim(step_id: int, worker_id: str, pools: frozenset[str] = frozenset()) -> Any:
    return execute.step_claim(step_id, rt=runtime_for(pools), worker_id=worker_id)


def step_run(step: Any, *, worker_id: str, pools: frozenset[str] = frozenset()) -> Any:
    return attempt.step_run(step, rt=runtime_for(pools), worker_id=worker_id)
