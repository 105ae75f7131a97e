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


# --- an approval's SLA comes from the policy that required it ----------------------------------------

SLA_POLICY = """
default: allow
rules:
  - id: echo-needs-a-person
    description: Echoes need a tier-1 approval within an hour
    action: agent:test_echo
    outcome: {decision: require_approval, tier: 1, sla: 1h}
"""


@pytest.fixture
def sla_policy() -> None:
    from policies.active import active_forget
    from policies.services import policy_install

    policy_install(source=SLA_POLICY, note="tests")
    active_forget()


def logged_in(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


def open_policy_approval(drive) -> Wait:
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    return Wait.objects.get(run=run, kind=WaitKind.APPROVAL, status=WaitStatus.OPEN)


@pytest.mark.django_db
def test_an_approval_opened_by_a_policy_is_due_when_its_sla_says(
    sla_policy, drive, fast_agents, operator, settings
):
    settings.SIGNALBOX_SLA_SECONDS = 600  # the default period must not be what applies
    wait = open_policy_approval(drive)
    assert wait.sla_due_at == wait.created_at + timedelta(hours=1)

    # Past the default period, within the policy's hour: it stays at tier 1.
    assert waits_escalate_breached(wait.created_at + timedelta(minutes=11)) == []
    assert waits_escalate_breached(wait.created_at + timedelta(minutes=59)) == []
    page = logged_in(operator).get("/inbox/").content.decode()
    assert f'data-deadline="{wait.sla_due_at.isoformat()}"' in page  # the countdown to it

    assert waits_escalate_breached(wait.sla_due_at) == [wait.pk]
    wait.refresh_from_db()
    assert (wait.tier, wait.sla_breaches) == (2, 1)
    assert breaches_of(wait)[0]["due_at"] == (wait.created_at + timedelta(hours=1)).isoformat()


@pytest.mark.django_db
def test_an_approval_without_a_policy_sla_keeps_the_default_period(drive, fast_agents):
    run = drive(run_submit(workflow="parallel_approvals", input={"text": "t"}).run.pk)
    wait = Wait.objects.filter(
        run=run, kind=WaitKind.APPROVAL, status=WaitStatus.OPEN, tier=1
    ).get()
    assert wait.sla_due_at is None
    assert waits_escalate_breached(wait.created_at + sla_period() - timedelta(seconds=1)) == []
    assert wait.pk in waits_escalate_breached(wait.created_at + sla_period() + timedelta(seconds=1))


@pytest.mark.django_db
def test_the_inbox_counts_down_to_the_sla(drive, fast_agents, operator, settings):
    settings.SIGNALBOX_SLA_SECONDS = 600
    escalated = open_escalation(drive)
    client = logged_in(operator)
    page = client.get("/inbox/").content.decode()
    # No policy SLA: due after the default period, long before the escalation expires.
    due = escalated.created_at + timedelta(seconds=600)
    assert due < escalated.deadline_at
    assert f'data-deadline="{due.isoformat()}"' in page
    assert f'data-deadline="{escalated.deadline_at.isoformat()}"' not in page
    item_page = client.get(f"/inbox/{escalated.pk}/").content.decode()
    assert f'data-deadline="{due.isoformat()}"' in item_page and "expires" in item_page
