"""SLA breach escalation: an open escalation not decided within its SLA moves up a tier once per
breach, is audited, restarts its SLA, and stops at tier 3; two schedulers escalate it once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Wait, WaitKind, WaitStatus
from orchestration.services import (
    escalation_resolve,
    run_submit,
    sla_period,
    waits_escalate_breached,
)
from orchestration.tasks import engine_tick


def open_escalation(drive) -> Wait:
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    return Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)


def breaches_of(wait: Wait) -> list[dict]:
    return list(
        AuditEvent.objects.filter(verb=Verb.WAIT_SLA_BREACHED, object_id=str(wait.pk))
        .order_by("id")
        .values_list("data", flat=True)
    )


@pytest.mark.django_db
def test_a_breach_escalates_tier_1_to_2_once_and_is_audited(drive, settings):
    settings.SIGNALBOX_SLA_SECONDS = 600
    wait = open_escalation(drive)
    assert wait.tier == 1
    assert waits_escalate_breached(wait.created_at + timedelta(seconds=599)) == []

    later = wait.created_at + timedelta(seconds=601)
    assert waits_escalate_breached(later) == [wait.pk]
    assert waits_escalate_breached(later) == []  # a second scheduler at the same moment: nothing
    wait.refresh_from_db()
    assert (wait.tier, wait.sla_breaches) == (2, 1)
    assert wait.sla_due_at == later + timedelta(seconds=600)  # the SLA restarted
    assert breaches_of(wait) == [
        {
            "from_tier": 1,
            "to_tier": 2,
            "due_at": None,
            "next_due_at": (later + timedelta(seconds=600)).isoformat(),
        }
    ]


@pytest.mark.django_db
def test_breaches_stop_at_tier_3(drive):
    wait = open_escalation(drive)
    at = wait.created_at
    for _ in range(5):
        at += sla_period() + timedelta(seconds=1)
        waits_escalate_breached(at)
    wait.refresh_from_db()
    assert wait.tier == 3
    assert [d["to_tier"] for d in breaches_of(wait)] == [2, 3]


@pytest.mark.django_db
def test_a_decided_item_does_not_escalate(drive, operator):
    wait = open_escalation(drive)
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort", reason="done")
    assert waits_escalate_breached(timezone.now() + timedelta(days=1)) == []


@pytest.mark.django_db
def test_the_engine_tick_runs_the_scan(drive, settings):
    settings.SIGNALBOX_SLA_SECONDS = 0
    wait = open_escalation(drive)
    assert engine_tick()["sla_escalated"] == 1
    wait.refresh_from_db()
    assert wait.tier == 2
