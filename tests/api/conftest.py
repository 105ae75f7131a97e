"""Fixtures for the REST API tests: users with and without permissions, token clients, and a
way to drive a run forward in this process (no Celery workers: steps are executed directly)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from audit.verbs import Verb
from console.models import ApiToken
from orchestration.models import Run, RunEvent, StateVersion, Step, Wait
from orchestration.services import run_submit


@pytest.fixture(autouse=True)
def _engine_in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents take no time and nothing goes to the channel layer. Wake-up messages are sent
    only after a commit, which these (rolled back) tests never reach, so none leave."""
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}


@pytest.fixture
def client_for(db: None) -> Callable[[Any], Client]:
    """A test client that authenticates as ``user`` with a fresh bearer token."""

    def make(user: Any) -> Client:
        _, raw = ApiToken.issue(user, "tests")
        return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")

    return make


@pytest.fixture
def operator_client(operator: Any, client_for: Callable[[Any], Client]) -> Client:
    return client_for(operator)


@pytest.fixture
def pending_approval(requester: Any, drive: Callable[[int], None]) -> Callable[..., Wait]:
    """Submit a run (as someone else than the operators who decide it) and drive it to its
    first open approval."""

    def make(workflow: str = "reference_workload", input: dict[str, Any] | None = None) -> Wait:
        run = run_submit(
            workflow=workflow,
            input=input if input is not None else {"needs_approval": True},
            submitted_by=requester,
        ).run
        drive(run.pk)
        wait = Wait.objects.filter(run=run, kind="approval", status="open").order_by("id").first()
        assert wait is not None, f"run {run.pk} has no open approval"
        return wait

    return make


@pytest.fixture
def no_backoff(settings: Any) -> None:
    """A transient failure is retried at once, so ``drive`` reaches the escalation."""
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}


@pytest.fixture
def escalated(operator: Any, drive: Callable[[int], Any], no_backoff: None) -> Callable[..., Wait]:
    """Submit a run of ``escalating`` (its ``act`` step fails twice, then escalates) and drive
    it to its open escalation."""

    def make(user: Any = None, workflow: str = "escalating", **input: Any) -> Wait:
        body = input or {"fail_attempts": 2, "text": "hi"}
        run = run_submit(workflow=workflow, input=body, submitted_by=user or operator).run
        drive(run.pk)
        wait = Wait.objects.filter(run=run, kind="escalation", status="open").first()
        assert wait is not None, f"run {run.pk} has no open escalation"
        return wait

    return make


@pytest.fixture
def row_counts() -> Callable[[], dict[str, int]]:
    """Rows in every table a write could touch: compare before and after a refused request."""

    def count() -> dict[str, int]:
        counts = {
            model.__name__: model.objects.count()
            for model in (Run, Step, Wait, RunEvent, StateVersion)
        }
        # A refusal is recorded (who was refused what) but changes nothing else.
        counts["AuditEvent"] = AuditEvent.objects.exclude(verb=Verb.ACCESS_DENIED).count()
        return counts

    return count
