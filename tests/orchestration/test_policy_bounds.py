"""The policy's bounds on a workflow's runs (issue 18): retries, run deadline (loop and fan-out
caps are tested in test_graph). The stricter of the workflow's own bound and the policy's wins."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from orchestration.models import Step, Wait
from orchestration.services import run_submit
from policies.active import active_forget
from policies.services import policy_install

pytestmark = pytest.mark.django_db


def _install(bounds: str) -> None:
    policy_install(source=f"default: allow\nbounds:\n{bounds}", note="bounds")
    active_forget()


@pytest.fixture
def quick_retries(settings: Any, fast_agents: None) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}


def test_without_a_retry_bound_a_transient_failure_is_retried(
    drive: Any, quick_retries: None
) -> None:
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 1, "text": "hi"}).run.pk)
    assert run.status == "succeeded"
    assert Step.objects.get(run=run, node="act").attempt == 2


def test_the_policys_max_retries_stops_retrying_sooner_and_escalates_naming_the_bound(
    drive: Any, quick_retries: None
) -> None:
    _install('  escalating: {max_retries: 0}\n  "*": {max_retries: 5}\n')
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 1, "text": "hi"}).run.pk)
    assert run.status == "waiting"
    act = Step.objects.get(run=run, node="act")
    assert act.max_attempts == 1 and act.attempt == 1
    wait = Wait.objects.get(run=run, kind="escalation", status="open")
    assert wait.action["error"]["detail"] == {
        **wait.action["error"]["detail"],
        "bound": "max_attempts",
        "limit": 1,
    }


def test_a_looser_policy_bound_never_loosens_the_workflows_own(
    drive: Any, quick_retries: None
) -> None:
    _install('  "*": {max_retries: 50}\n')
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 1, "text": "hi"}).run.pk)
    act = Step.objects.get(run=run, node="act")
    assert run.status == "succeeded" and act.max_attempts < 51


def test_the_policys_run_deadline_shortens_a_runs_deadline() -> None:
    _install('  "*": {run_deadline: 15m}\n')
    run = run_submit(workflow="escalating", input={"text": "hi"}).run
    assert run.deadline_at - run.created_at == timedelta(minutes=15)


def test_a_later_run_deadline_than_the_workflows_changes_nothing() -> None:
    _install('  "*": {run_deadline: 1000h}\n')
    run = run_submit(workflow="escalating", input={"text": "hi"}).run
    assert run.deadline_at - run.created_at == timedelta(hours=24)  # the workflow's own is sooner
