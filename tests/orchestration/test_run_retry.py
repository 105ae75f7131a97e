"""Retrying a failed run from its failed step (services.run_retry), with real workers."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import Code, Conflict, InvalidInput, PermissionDenied
from orchestration.models import Run, Step
from orchestration.services import run_cancel, run_retry, run_submit
from tests.conftest import wait_for_run, wait_until


@pytest.fixture
def quick_retries(settings: Any) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_failed_run_retried_from_its_failed_step_completes(workers, operator, quick_retries):
    # test_flaky has 3 attempts; failing 4 times ends the run; the retry's fresh budget wins.
    run = run_submit(workflow="flaky_chain", input={"failures": 4}, submitted_by=operator).run
    run = wait_for_run(run.pk)
    assert run.status == "failed", run.status
    (failed,) = Step.objects.filter(run=run)
    assert failed.status == "failed"

    retried = run_retry(run_id=run.pk, user=operator, reason="provider is back")
    assert retried.status == "running" and retried.error_code == ""

    # A second click finds the run running: refused with a code, nothing changes.
    with pytest.raises(Conflict) as second:
        run_retry(run_id=run.pk, user=operator, reason="again")
    assert second.value.code == Code.RUN_NOT_FAILED

    run = wait_for_run(run.pk, statuses=("succeeded", "failed"))
    assert run.status == "succeeded", run.error_message
    (step,) = Step.objects.filter(run=run)  # the same step ran again, no new one
    assert step.pk == failed.pk and step.status == "succeeded"
    assert step.output == {"text": "ok on attempt 5"}
    event = wait_until(
        lambda: AuditEvent.objects.filter(run_id=run.pk, verb=Verb.RUN_RETRIED).first()
    )
    assert event.actor_id == "operator"
    assert event.data["reason"] == "provider is back"
    assert AuditEvent.objects.filter(run_id=run.pk, verb=Verb.RUN_RETRIED).count() == 1


@pytest.mark.django_db
def test_only_a_failed_run_can_be_retried(drive, operator):
    run = run_submit(workflow="flaky_chain", input={"failures": 0}, submitted_by=operator).run
    run = drive(run.pk)
    assert run.status == "succeeded"
    with pytest.raises(Conflict) as refused:
        run_retry(run_id=run.pk, user=operator, reason="why not")
    assert refused.value.code == Code.RUN_NOT_FAILED
    assert Run.objects.get(pk=run.pk).status == "succeeded"


@pytest.mark.django_db
def test_a_retry_needs_a_reason_and_the_right_to_decide(drive, operator, viewer, quick_retries):
    run = run_submit(workflow="flaky_chain", input={"failures": 9}, submitted_by=operator).run
    run = drive(run.pk)
    assert run.status == "failed"
    with pytest.raises(InvalidInput) as no_reason:
        run_retry(run_id=run.pk, user=operator, reason="  ")
    assert no_reason.value.code == Code.REASON_REQUIRED
    with pytest.raises(PermissionDenied):
        run_retry(run_id=run.pk, user=viewer, reason="let me")
    assert Run.objects.get(pk=run.pk).status == "failed"


@pytest.mark.django_db
def test_a_cancelled_run_is_not_retried(operator):
    run = run_submit(workflow="slow_then_echo", input={"seconds": 60}, submitted_by=operator).run
    run_cancel(run_id=run.pk, user=operator, reason="wrong input")
    with pytest.raises(Conflict) as refused:
        run_retry(run_id=run.pk, user=operator, reason="try again")
    assert refused.value.code == Code.RUN_NOT_FAILED
    assert refused.value.detail == {"status": "cancelled"}
