"""Fixtures for the console's tests: the engine runs in this process (steps executed directly,
agents take no time, nothing reaches Redis), and users with the demo roles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestration.executor import step_execute
from orchestration.models import Run, Step, StepStatus
from tests.factories import UserFactory

POOLS = frozenset({"default", "research"})


@pytest.fixture(autouse=True)
def _engine_in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "AGENT_TIME_SCALE": 0.0,
        "LIVE_EVENTS": False,
        # A demo agent's simulated transient failure is retried at once, not after a backoff.
        "RETRY_BASE_SECONDS": 0.0,
    }
    from console.celery import app

    # Celery reads Django's settings once, on first use of app.conf: make that happen with the
    # real settings, or the override below would become the app's broker for the whole session
    # (and the real worker tests that follow would publish to memory).
    app.conf.broker_url  # noqa: B018
    monkeypatch.setitem(app.conf, "broker_url", "memory://")
    settings.CELERY_BROKER_URL = "memory://"


@pytest.fixture
def viewer(db: None) -> Any:
    """Sees every run (as operators, admins and auditors do)."""
    return UserFactory(username="viewer", permissions=["orchestration.view_run"])


@pytest.fixture
def submitter(db: None) -> Any:
    """May submit runs and sees only their own."""
    return UserFactory(username="submitter", permissions=["orchestration.add_run"])


@pytest.fixture
def drive() -> Callable[[int], Run]:
    """Execute the run's queued steps (and what they unlock) until none is queued."""

    def run_queued(run_id: int) -> Run:
        for _ in range(50):
            queued = list(
                Step.objects.filter(run_id=run_id, status=StepStatus.QUEUED).values_list(
                    "pk", flat=True
                )
            )
            if not queued:
                return Run.objects.get(pk=run_id)
            for step_id in queued:
                step_execute(step_id, worker_id="t", pools=POOLS)
        raise AssertionError(f"run {run_id} still has queued steps after 50 rounds")

    return run_queued
