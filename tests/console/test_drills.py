"""Escalation drills: fired by a policy admin through the real engine, visible as a drill,
acknowledged (with the seconds it took) when someone answers it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import InvalidInput, PermissionDenied
from orchestration.models import Run, Wait, WaitKind, WaitStatus
from orchestration.services import drill_fire, escalation_resolve, run_submit, wait_claim
from tests.factories import UserFactory


@pytest.fixture
def admin(db):
    return UserFactory(username="policy-admin", permissions=["policies.review_policy"])


@pytest.mark.django_db
def test_a_fired_drill_escalates_as_a_drill_and_answering_it_acknowledges_it(
    admin, operator, drive
):
    run = drill_fire(user=admin, tier=2)
    assert AuditEvent.objects.filter(verb=Verb.DRILL_FIRED, run_id=run.pk).count() == 1
    run = drive(run.pk)
    assert run.is_drill
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)
    assert wait.is_drill and wait.tier == 2
    assert "DRILL" in wait.reason

    Wait.objects.filter(pk=wait.pk).update(created_at=timezone.now() - timedelta(seconds=42))
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort", reason="drill seen")
    ack = AuditEvent.objects.get(verb=Verb.DRILL_ACKNOWLEDGED, run_id=run.pk)
    assert 42 <= ack.data["seconds"] < 60
    assert ack.actor_id == "operator" and ack.data["how"] == "abort"


@pytest.mark.django_db
def test_claiming_a_drill_acknowledges_it_once_and_the_drills_page_shows_it(admin, operator, drive):
    run = drive(drill_fire(user=admin, tier=1).pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)
    Wait.objects.filter(pk=wait.pk).update(created_at=timezone.now() - timedelta(seconds=30))
    client = Client()
    client.force_login(operator)
    assert client.post(f"/inbox/{wait.pk}/", {"op": "claim"}).status_code == 302
    (ack,) = AuditEvent.objects.filter(verb=Verb.DRILL_ACKNOWLEDGED, run_id=run.pk)
    assert (
        30 <= ack.data["seconds"] < 60 and ack.data["how"] == "claim" and ack.actor_id == "operator"
    )

    # Claiming again, then answering, does not acknowledge it a second time (or later).
    wait_claim(wait_id=wait.pk, user=operator)
    Wait.objects.filter(pk=wait.pk).update(created_at=timezone.now() - timedelta(seconds=600))
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort", reason="drill seen")
    assert AuditEvent.objects.filter(verb=Verb.DRILL_ACKNOWLEDGED, run_id=run.pk).count() == 1

    admin_client = Client()
    admin_client.force_login(admin)
    page = admin_client.get("/drills/").content.decode()
    row = page[page.index('class="drill-row"') :]
    assert (
        "operator" in row
        and f"{round(ack.data['seconds'], 1)} s</td>" in row
        and "<td>claimed</td>" in row
    )


@pytest.mark.django_db
def test_a_real_escalation_is_not_a_drill(operator, drive):
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION)
    assert not run.is_drill and wait.tier == 1
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort")
    assert not AuditEvent.objects.filter(verb=Verb.DRILL_ACKNOWLEDGED).exists()


@pytest.mark.django_db
def test_only_policy_admins_fire_drills_and_bad_tiers_are_refused(admin, operator):
    with pytest.raises(PermissionDenied):
        drill_fire(user=operator, tier=1)
    # Refused in the selectors, as every other refusal: recorded with who was refused.
    refusal = AuditEvent.objects.get(verb=Verb.ACCESS_DENIED)
    assert refusal.actor_id == operator.username and "drills" in refusal.data["what"]
    with pytest.raises(InvalidInput):
        drill_fire(user=admin, tier=4)
    assert not Run.objects.filter(workflow_name="drill").exists()


@pytest.mark.django_db
def test_the_drills_page_fires_and_lists_drills_with_time_to_acknowledge(admin, operator, drive):
    client = Client()
    client.force_login(admin)
    assert client.get("/drills/").status_code == 200
    response = client.post("/drills/", {"tier": "3", "tenant": "default", "note": "quarterly"})
    assert response.status_code == 302
    run = drive(Run.objects.get(workflow_name="drill").pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION)
    assert wait.tier == 3
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort")
    drill_fire(user=admin, tier=1)  # a second, not yet answered

    page = client.get("/drills/").content.decode()
    assert page.count('class="drill-row"') == 2
    assert "DRILL" in page and "operator" in page and " s</td>" in page

    assert client.post("/drills/", {"tier": "9"}).status_code == 400
    outsider = Client()
    outsider.force_login(operator)
    assert outsider.get("/drills/").status_code == 403

    with CaptureQueriesContext(connection) as two:
        client.get("/drills/")
    for _ in range(3):
        drill_fire(user=admin, tier=1)
    with CaptureQueriesContext(connection) as five:
        client.get("/drills/")
    assert len(five) == len(two) <= 12  # the list costs the same whatever the number of drills


@pytest.mark.django_db
def test_the_drill_command_fires_one(capsys):
    call_command("drill", "--tier", "2")
    assert "Drill fired" in capsys.readouterr().out
    assert AuditEvent.objects.filter(verb=Verb.DRILL_FIRED).count() == 1
