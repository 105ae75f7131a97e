"""A broker outage never turns committed work into a reported failure: the change is done, its
wake-up goes out when the broker is back (the reaper's next pass, not after its usual wait).
The broker here is "down" as a client sees it: its address refuses connections."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from console.celery import app
from orchestration import recovery
from orchestration.models import Step, StepStatus, Wait
from orchestration.services import approval_decide, run_submit

pytestmark = pytest.mark.django_db(transaction=True)

#: Nothing listens there: every connection is refused at once.
DOWN = "redis://127.0.0.1:1/0"


@pytest.fixture
def broker_down(settings: Any) -> Iterator[None]:
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "REPUBLISH_AFTER_SECONDS": 3600,
        "LIVE_EVENTS": False,
    }
    real = app.conf.broker_url
    app.conf.broker_url = DOWN
    try:
        yield
    finally:
        app.conf.broker_url = real


def _queued_messages(step_id: int) -> int:
    """Wake-up messages for ``step_id`` waiting in its pool's queue."""
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    bodies = [
        base64.b64decode(json.loads(m)["body"]).decode()
        for m in client.lrange("pool.default", 0, -1)
    ]
    return sum(1 for body in bodies if body.startswith(f"[[{step_id}]"))


def test_a_submit_while_the_broker_is_down_is_created_and_its_step_is_woken_when_it_is_back(
    operator_client: Any, broker_down: None
) -> None:
    response = operator_client.post(
        "/api/v1/runs",
        {"workflow": "reference_workload", "input": {"topic": "outage"}},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    step = Step.objects.get(run_id=response.json()["id"], node="classify")
    # Committed, and known not to have been woken: no message went out.
    assert step.status == StepStatus.QUEUED and step.published_at is None

    app.conf.broker_url = django_settings.REDIS_URL  # the broker is back
    assert recovery.republish_queued() >= 1  # at its next pass, though its usual wait is an hour
    assert _queued_messages(step.pk) == 1
    step.refresh_from_db()
    assert step.published_at is not None


def test_a_decision_while_the_broker_is_down_is_recorded_and_reported_done(
    operator: Any, pending_approval: Any, settings: Any
) -> None:
    wait = pending_approval()
    real = app.conf.broker_url
    app.conf.broker_url = DOWN
    try:
        decided = approval_decide(wait_id=wait.pk, user=operator, decision="approve", reason="fine")
    finally:
        app.conf.broker_url = real
    assert decided.status == "approved"
    step = Step.objects.get(pk=wait.step_id)
    assert step.status == StepStatus.QUEUED and step.published_at is None
    assert Wait.objects.get(pk=wait.pk).status == "approved"


def test_an_outside_event_while_the_broker_is_down_is_applied_and_reported_done(
    operator_client: Any, operator: Any, drive: Any, broker_down: None
) -> None:
    app.conf.broker_url = django_settings.REDIS_URL  # up while the run gets to its wait
    run = run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run
    drive(run.pk)
    assert Wait.objects.filter(run=run, kind="event", status="open").exists()
    app.conf.broker_url = DOWN
    response = operator_client.post(
        f"/api/v1/runs/{run.pk}/events",
        {"name": "payment.settled", "event_id": "evt-outage", "payload": {"ok": 1}},
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    assert response.json()["applied"] is True
    step = Step.objects.get(run=run, node="after")
    assert step.status == StepStatus.QUEUED and step.published_at is None
