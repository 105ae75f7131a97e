"""Recovery paths: stale approvals, lease renewal, lost wake-up messages."""

from __future__ import annotations

import time

import pytest
import redis
from django.conf import settings as django_settings

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration import recovery
from orchestration.models import Run, Step, Wait
from orchestration.services import approval_decide, run_submit
from tests.conftest import wait_for_run, wait_until
from tests.support.engine import step_execute


def run_queued(run_id: int, node: str) -> None:
    step = Step.objects.get(run_id=run_id, node=node, status="queued")
    step_execute(step.pk, worker_id="test", pools=frozenset())


@pytest.mark.django_db
def test_an_approval_does_not_apply_when_the_action_changed_before_it_ran(fast_agents):
    run = run_submit(workflow="approval_drift", input={"text": "v1"}).run
    run_queued(run.pk, "start")
    first = Wait.objects.get(run=run, status="open")
    assert first.action["input"] == {"text": "echo:v1"}
    approval_decide(wait_id=first.pk, user=None, decision="approve", reason="for echo:v1")
    # A parallel branch rewrites the key the approved action reads, before the action runs.
    run_queued(run.pk, "mutate")
    run_queued(run.pk, "act")

    act = Step.objects.get(run=run, node="act")
    assert act.status == "waiting"  # it did not run on a stale approval
    second = Wait.objects.get(run=run, status="open")
    assert second.pk != first.pk
    assert second.action["input"] == {"text": "echo:echo:v1"}
    assert (
        AuditEvent.objects.filter(run_id=run.pk, verb=Verb.APPROVAL_STALE, step_id=act.pk).count()
        == 1
    )

    approval_decide(wait_id=second.pk, user=None, decision="approve", reason="for the new text")
    run_queued(run.pk, "act")
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert run.state["acted"] == "echo:echo:echo:v1"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_step_longer_than_its_lease_keeps_it_by_heartbeats(start_worker):
    start_worker("steady", concurrency=1, SIGNALBOX_LEASE_SECONDS="1.5")
    run = run_submit(workflow="slow_then_echo", input={"seconds": 4}).run
    wait_until(
        lambda: Step.objects.filter(run=run, node="slow", status="running").exists(),
        what="slow running",
    )
    for _ in range(6):  # the reaper looks repeatedly while the step outlives its 1.5 s lease
        assert recovery.reap_expired_leases() == 0
        time.sleep(0.5)
    run = wait_for_run(run.pk)
    assert run.status == "succeeded"
    assert Step.objects.get(run=run, node="slow").attempt == 1


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_queued_work_whose_message_was_lost_is_published_again(start_worker, settings):
    settings.SIGNALBOX = {**settings.SIGNALBOX, "REPUBLISH_AFTER_SECONDS": 0.0}
    run = run_submit(workflow="reference_workload", input={}).run
    # The broker loses every message (a Redis restart without persistence).
    redis.Redis.from_url(django_settings.REDIS_URL).flushdb()
    start_worker("late")
    time.sleep(1)
    assert Run.objects.get(pk=run.pk).status == "queued"  # nothing woke the worker
    assert recovery.republish_queued() == 1
    run = wait_for_run(run.pk)
    assert run.status == "succeeded"
