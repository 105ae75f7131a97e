"""Skipping an escalated step from its run page: a value checked against the step's output
contract and a reason, confirmed in its own form; refusals shown beside the value, kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Step, Wait
from orchestration.services import run_submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def escalated(drive: Callable[[int], Run]) -> Wait:
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 9}).run.pk)
    return Wait.objects.get(run=run, kind="escalation", status="open")


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def skip(client: Client, wait: Wait, value: str, reason: str = "the answer is known") -> Any:
    return client.post(
        f"/runs/{wait.run_id}/skip/",
        {"wait": wait.pk, "value": value, "reason": reason},
        follow=True,
    )


def test_the_run_page_offers_a_skip_for_an_escalated_step(operator: Any, escalated: Wait) -> None:
    html = logged_in(operator).get(f"/runs/{escalated.run_id}/").content.decode()
    assert f'id="skip-{escalated.pk}"' in html and "<code>act</code>" in html
    assert f'action="/runs/{escalated.run_id}/skip/"' in html and "Confirm skip" in html


def test_a_skip_with_a_valid_value_succeeds_the_step_and_the_run_goes_on(
    operator: Any, escalated: Wait, drive: Callable[[int], Run]
) -> None:
    response = skip(logged_in(operator), escalated, '{"text": "written by hand"}')
    assert response.status_code == 200
    assert "Step skipped with the value given" in response.content.decode()
    wait = Wait.objects.get(pk=escalated.pk)
    assert (wait.status, wait.decision, wait.decided_by) == ("resolved", "skip", operator)
    step = Step.objects.get(pk=wait.step_id)
    assert step.status == "succeeded" and step.output == {"text": "written by hand"}
    run = drive(wait.run_id)
    assert run.status == "succeeded" and run.state["final"] == "echo:written by hand"
    assert AuditEvent.objects.filter(verb=Verb.ESCALATION_SKIPPED, object_id=str(wait.pk)).exists()


def test_a_value_that_breaks_the_contract_is_refused_beside_the_value_and_kept(
    operator: Any, escalated: Wait
) -> None:
    client = logged_in(operator)
    html = skip(client, escalated, '{"text": 5}').content.decode()
    error = html[html.index(f'id="skip-error-{escalated.pk}"') :][:400]
    assert "output contract" in error and "text" in error
    assert f'<details class="run-action" id="skip-{escalated.pk}" open>' in html
    assert "{&quot;text&quot;: 5}</textarea>" in html  # the value typed, to fix
    assert Wait.objects.get(pk=escalated.pk).status == "open"
    # Shown once: the next visit starts clean.
    assert (
        f'id="skip-error-{escalated.pk}"'
        not in client.get(f"/runs/{escalated.run_id}/").content.decode()
    )


@pytest.mark.parametrize(
    ("value", "reason", "says"),
    [
        ("{not json", "why not", "not valid JSON"),
        ('{"text": "ok"}', "  ", "a reason is required"),
    ],
)
def test_bad_json_or_no_reason_is_refused_in_place(
    operator: Any, escalated: Wait, value: str, reason: str, says: str
) -> None:
    html = skip(logged_in(operator), escalated, value, reason).content.decode()
    assert says in html[html.index(f'id="skip-error-{escalated.pk}"') :][:400]
    assert Wait.objects.get(pk=escalated.pk).status == "open"


def test_a_second_skip_says_it_was_already_decided(operator: Any, escalated: Wait) -> None:
    client = logged_in(operator)
    skip(client, escalated, '{"text": "first"}')
    html = skip(client, escalated, '{"text": "second"}').content.decode()
    refusal = html[html.index('id="skip-refused"') :][:400]
    assert "already resolved" in refusal and "by operator" in refusal


def test_a_viewer_may_not_skip(viewer: Any, escalated: Wait) -> None:
    client = logged_in(viewer)
    assert (
        "skip-" + str(escalated.pk) not in client.get(f"/runs/{escalated.run_id}/").content.decode()
    )
    response = client.post(
        f"/runs/{escalated.run_id}/skip/", {"wait": escalated.pk, "value": "{}", "reason": "x"}
    )
    assert response.status_code == 403
    assert Wait.objects.get(pk=escalated.pk).status == "open"


# --- the failed step of a failed run ------------------------------------------------------------------


@pytest.fixture
def failed(operator: Any, drive: Callable[[int], Run]) -> Run:
    # test_flaky has 3 attempts; failing 4 times fails the step and the run.
    run = drive(
        run_submit(workflow="flaky_chain", input={"failures": 4}, submitted_by=operator).run.pk
    )
    assert run.status == "failed"
    return run


def skip_failed(client: Client, run: Run, value: str, reason: str = "done by hand") -> Any:
    return client.post(
        f"/runs/{run.pk}/skip/",
        {"failed_step": "1", "value": value, "reason": reason},
        follow=True,
    )


def test_the_failed_step_of_a_failed_run_is_skipped_and_the_run_completes(
    operator: Any, failed: Run, drive: Callable[[int], Run]
) -> None:
    client = logged_in(operator)
    html = client.get(f"/runs/{failed.pk}/").content.decode()
    assert 'id="skip-failed"' in html and "<code>flaky</code>" in html

    html = skip_failed(client, failed, '{"text": "sent by hand"}').content.decode()
    assert "Step skipped with the value given" in html
    run = drive(failed.pk)
    assert run.status == "succeeded" and run.state["text"] == "sent by hand"
    step = Step.objects.get(run=run)
    assert step.status == "succeeded" and step.degraded.startswith("skipped by operator")
    event = AuditEvent.objects.get(verb=Verb.STEP_SKIPPED, run_id=run.pk)
    assert event.actor_id == "operator" and event.data["reason"] == "done by hand"
    # A second skip (a stale page) finds the run no longer failed.
    html = skip_failed(client, failed, '{"text": "again"}').content.decode()
    assert "only a failed run" in html[html.index('id="skip-refused"') :][:300]


def test_a_failed_step_skip_that_breaks_the_contract_is_refused_beside_the_value(
    operator: Any, failed: Run
) -> None:
    html = skip_failed(logged_in(operator), failed, '{"text": 5}').content.decode()
    assert '<details class="run-action" id="skip-failed" open>' in html
    error = html[html.index('id="skip-failed-error"') :][:400]
    assert "output contract" in error and "text" in error
    assert "{&quot;text&quot;: 5}</textarea>" in html
    assert Run.objects.get(pk=failed.pk).status == "failed"


def test_a_viewer_may_not_skip_a_failed_step_and_the_refusal_is_audited(
    viewer: Any, failed: Run
) -> None:
    response = logged_in(viewer).post(
        f"/runs/{failed.pk}/skip/", {"failed_step": "1", "value": '{"text": "x"}', "reason": "x"}
    )
    assert response.status_code == 403
    assert Run.objects.get(pk=failed.pk).status == "failed"
    # Checked before the transaction: the refusal's audit record is not rolled back with it.
    assert AuditEvent.objects.filter(verb=Verb.ACCESS_DENIED, run_id=failed.pk).exists()
