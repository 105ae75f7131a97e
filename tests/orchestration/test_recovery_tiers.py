"""The recovery tiers, through the real engine: fallback agent, degraded results, escalation to
an operator (retry, skip with a value, abort), compensations in reverse order, soft and hard
step timeouts, and the bounds that stop a retry storm."""

from __future__ import annotations

import time

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import Conflict, InvalidInput
from orchestration.models import (
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    ToolCall,
    Wait,
    WaitKind,
    WaitStatus,
)
from orchestration.services import approval_decide, escalation_resolve, run_cancel, run_submit
from tests.conftest import wait_for_run, wait_until
from tests.support.stub_provider import stub_provider_server


def verbs_of(run: Run) -> list[int]:
    return list(
        AuditEvent.objects.filter(run_id=run.pk).order_by("id").values_list("verb", flat=True)
    )


def open_escalation(run_id: int) -> Wait:
    return wait_until(
        lambda: Wait.objects.filter(
            run_id=run_id, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN
        ).first(),
        what=f"an escalation on run {run_id}",
    )


# --- in-process (the `drive` fixture runs queued steps with the real executor) ----------------------


@pytest.mark.django_db
def test_a_permanent_failure_escalates_at_once_with_its_full_context(operator, drive):
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    assert run.status == RunStatus.WAITING
    step = Step.objects.get(run=run, node="act")
    assert step.status == StepStatus.WAITING and step.attempt == 1  # permanent: not retried
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION)
    context = wait.action
    assert context["why"] == "permanent error"
    assert context["error"]["code"] == "refused"
    assert context["agents_tried"] == ["test_fails_until"]
    assert [(a["agent"], a["code"]) for a in context["attempts"]] == [
        ("test_fails_until", "refused")
    ]
    assert context["input"] == {"text": "echo:hello", "fail_attempts": 99, "permanent": True}
    assert context["actions"] == ["retry", "skip", "abort"]
    assert context["skip_schema"]["properties"]["text"]["type"] == "string"
    assert wait.reason.startswith("permanent error: the service refused")
    assert not Step.objects.filter(run=run, node="finish").exists()  # nothing handed on
    assert Verb.STEP_ESCALATED in verbs_of(run)


@pytest.mark.django_db
def test_skip_with_a_value_is_checked_against_the_contract_then_the_run_goes_on_degraded(
    operator, drive
):
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION)
    with pytest.raises(InvalidInput) as bad:
        escalation_resolve(
            wait_id=wait.pk, user=operator, action="skip", output={"text": 5}, reason="typed it"
        )
    assert bad.value.code == "output_contract"
    wait.refresh_from_db()
    assert wait.status == WaitStatus.OPEN  # a rejected value changes nothing

    escalation_resolve(
        wait_id=wait.pk,
        user=operator,
        action="skip",
        output={"text": "written by hand"},
        reason="vendor down",
    )
    run = drive(run.pk)
    assert run.status == RunStatus.SUCCEEDED
    assert run.state["final"] == "echo:written by hand"  # the successor got the supplied value
    act = Step.objects.get(run=run, node="act")
    assert act.status == StepStatus.SUCCEEDED and act.degraded.startswith("skipped by operator")
    assert run.degraded == [{"step": "act", "reason": act.degraded}]
    assert run.output["_degraded"] == run.degraded
    assert Verb.ESCALATION_SKIPPED in verbs_of(run)


@pytest.mark.django_db
def test_abort_fails_the_run_and_a_second_answer_is_refused(operator, drive):
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION)
    escalation_resolve(wait_id=wait.pk, user=operator, action="abort", reason="customer withdrew")
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED and run.error_code == "aborted"
    assert "aborted by operator after escalation: customer withdrew" in run.error_message
    with pytest.raises(Conflict) as again:
        escalation_resolve(wait_id=wait.pk, user=operator, action="retry")
    assert again.value.code == "already_decided"
    assert "abort by operator" in again.value.message


@pytest.mark.django_db
def test_the_fallback_agent_takes_over_after_the_primary_is_refused(drive):
    run = drive(run_submit(workflow="with_fallback", input={"permanent": True}).run.pk)
    assert run.status == RunStatus.SUCCEEDED, run.error_message
    step = Step.objects.get(run=run, node="answer")
    assert step.agent == "test_backup" and step.output == {"text": "backup:hello"}
    assert [(a["agent"], a["code"]) for a in step.attempts_log] == [("test_fails_until", "refused")]
    assert run.state["final"] == "echo:backup:hello"
    fallback = AuditEvent.objects.get(run_id=run.pk, verb=Verb.STEP_FALLBACK)
    assert (
        fallback.data["from_agent"] == "test_fails_until"
        and fallback.data["to_agent"] == "test_backup"
    )


@pytest.mark.django_db
def test_degraded_results_are_visible_on_the_run_and_in_its_output(drive):
    run = drive(run_submit(workflow="with_degraded", input={"permanent": True}).run.pk)
    assert run.status == RunStatus.SUCCEEDED, run.error_message
    answer = Step.objects.get(run=run, node="answer")
    assert answer.output == {"text": "summary only (refused)"}  # the declared degraded result
    assert answer.degraded == "no sources answered (after refused)"
    gather = Step.objects.get(run=run, node="gather")
    assert gather.degraded == "partial: 2 of 5 sources"  # reported by the agent itself
    assert run.degraded == [
        {"step": "answer", "reason": "no sources answered (after refused)"},
        {"step": "gather", "reason": "partial: 2 of 5 sources"},
    ]
    assert run.output["_degraded"] == run.degraded
    assert any("partial: 2 of 5 sources" in note for note in run.notes)
    assert verbs_of(run).count(Verb.STEP_DEGRADED) == 2


# --- real worker processes ------------------------------------------------------------------------


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_retries_exhausted_escalate_and_an_operator_retry_completes_the_run(start_worker, operator):
    start_worker("w", concurrency=1)
    run = run_submit(workflow="escalating", input={"fail_attempts": 2}).run
    wait = open_escalation(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.WAITING
    assert wait.action["why"] == "retries exhausted"
    assert [a["code"] for a in wait.action["attempts"]] == ["unavailable", "unavailable"]
    assert wait.action["error"]["detail"]["bound"] == "max_attempts"

    escalation_resolve(wait_id=wait.pk, user=operator, action="retry", reason="provider is back")
    run = wait_for_run(run.pk)
    assert run.status == RunStatus.SUCCEEDED, run.error_message
    act = Step.objects.get(run=run, node="act")
    assert act.attempt == 3 and act.output == {"text": "ok:echo:hello on attempt 3"}
    assert run.state["final"] == "echo:ok:echo:hello on attempt 3"


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_failure_after_two_side_effects_runs_both_compensations_in_reverse_order(start_worker):
    with stub_provider_server("test-effect") as stub:
        start_worker("w", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        run = wait_for_run(run_submit(workflow="saga", input={"permanent": True}).run.pk)
        effects = [call.body["text"] for call in stub.requests]
    assert run.status == RunStatus.FAILED and run.error_code == "refused"
    assert effects == ["do reserve", "do charge", "undo charge", "undo reserve"]
    assert len({call.idempotency_key for call in stub.requests}) == 4  # each effect its own key
    undo = list(Step.objects.filter(run=run, kind=StepKind.COMPENSATE).order_by("finished_at"))
    assert [(s.key, s.status) for s in undo] == [
        ("undo:charge", "succeeded"),
        ("undo:reserve", "succeeded"),
    ]
    originals = {s.pk: s.node for s in Step.objects.filter(run=run, kind=StepKind.AGENT)}
    assert [originals[s.parent_id] for s in undo] == ["charge", "reserve"]
    verbs = verbs_of(run)
    assert (
        verbs.index(Verb.RUN_FAILED)
        < verbs.index(Verb.RUN_COMPENSATING)
        < verbs.index(Verb.RUN_COMPENSATED)
    )
    assert verbs.count(Verb.STEP_COMPENSATED) == 2
    assert (
        ToolCall.objects.filter(run=run, step__kind=StepKind.COMPENSATE, status="succeeded").count()
        == 2
    )


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_run_undoes_its_side_effects_and_ends_cancelled(start_worker, operator):
    with stub_provider_server("test-effect") as stub:
        start_worker("w", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        run = run_submit(workflow="saga_waiting", input={}).run
        wait_for_run(run.pk, statuses=("waiting",))
        run_cancel(run_id=run.pk, user=operator, reason="order withdrawn")
        run = wait_for_run(run.pk)
        effects = [call.body["text"] for call in stub.requests]
    assert run.status == RunStatus.CANCELLED and run.error_code == "cancelled"
    assert effects == ["do reserve", "do charge", "undo charge", "undo reserve"]
    assert Step.objects.get(run=run, node="settle").status == StepStatus.CANCELLED


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_failing_compensation_is_retried_then_escalated_and_the_run_waits_for_it(
    start_worker, operator
):
    with stub_provider_server("test-effect") as stub:
        start_worker("w", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        run = run_submit(workflow="saga", input={"permanent": True, "undo_failures": 2}).run
        wait = open_escalation(run.pk)
        run.refresh_from_db()
        assert run.status == RunStatus.COMPENSATING  # failed, still undoing: not yet ended
        assert wait.action["compensation"] is True and wait.action["step"] == "undo:reserve"
        assert [a["code"] for a in wait.action["attempts"]] == ["unavailable", "unavailable"]
        with pytest.raises(Conflict) as busy:
            run_cancel(run_id=run.pk, user=operator)
        assert busy.value.code == "run_compensating"

        escalation_resolve(wait_id=wait.pk, user=operator, action="retry", reason="ledger is back")
        run = wait_for_run(run.pk)
        effects = [call.body["text"] for call in stub.requests]
    assert run.status == RunStatus.FAILED and run.error_code == "refused"
    assert effects == ["do reserve", "do charge", "undo charge", "undo reserve"]
    assert Step.objects.get(run=run, node="undo:reserve").attempt == 3


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_the_soft_timeout_interrupts_the_agent_and_the_retry_succeeds(start_worker):
    start_worker("w", concurrency=1)
    started = time.monotonic()
    run = wait_for_run(
        run_submit(workflow="sleepy", input={"seconds": 10, "slow_attempts": 1}).run.pk
    )
    assert run.status == RunStatus.SUCCEEDED, run.error_message
    assert time.monotonic() - started < 8  # not the 10 s the agent wanted to sleep
    step = Step.objects.get(run=run, node="nap")
    assert step.output == {"text": "awake on attempt 2"}
    assert [a["code"] for a in step.attempts_log] == ["step_timeout"]


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_the_hard_timeout_fences_off_an_agent_that_ignores_the_soft_one(start_worker):
    start_worker("w", concurrency=2)
    run = run_submit(
        workflow="sleepy", input={"seconds": 4, "slow_attempts": 1, "stubborn": True}
    ).run
    run = wait_for_run(run.pk)
    assert run.status == RunStatus.SUCCEEDED, run.error_message
    step = Step.objects.get(run=run, node="nap")
    assert [a["code"] for a in step.attempts_log] == ["step_hard_timeout"]
    assert step.output == {"text": "awake on attempt 2"}
    time.sleep(4)  # the stuck first attempt wakes up and tries to commit: it is fenced off
    step.refresh_from_db()
    assert step.output == {"text": "awake on attempt 2"} and step.attempt == 2
    assert (
        AuditEvent.objects.filter(run_id=run.pk, step_id=step.pk, verb=Verb.STEP_SUCCEEDED).count()
        == 1
    )


@pytest.mark.worker
@pytest.mark.django_db(transaction=True)
def test_a_retry_storm_is_stopped_by_the_retry_window_and_the_run_says_so(start_worker):
    start_worker("w", concurrency=1)
    run = wait_for_run(run_submit(workflow="retry_storm", input={}).run.pk)
    assert run.status == RunStatus.FAILED and run.error_code == "retry_window"
    assert "retry window" in run.error_message
    step = Step.objects.get(run=run, node="storm")
    assert 1 <= step.failures < 20  # far below its max_attempts of 1000
    assert step.error_detail["bound"] == "retry_within"


@pytest.mark.django_db
def test_the_refund_desk_reverses_a_refund_whose_settlement_never_came(
    drive, fast_agents, operator
):
    from datetime import timedelta

    from django.utils import timezone

    from orchestration import recovery

    run = run_submit(
        workflow="refund_desk",
        input={"message": "The kettle arrived damaged, refund please."},
        seed=3,
    ).run
    run = drive(run.pk)
    for approval in Wait.objects.filter(run=run, kind=WaitKind.APPROVAL, status=WaitStatus.OPEN):
        approval_decide(wait_id=approval.pk, user=operator, decision="approve")
    run = drive(run.pk)
    settlement = Wait.objects.get(run=run, kind=WaitKind.EVENT, status=WaitStatus.OPEN)
    Wait.objects.filter(pk=settlement.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert recovery.expire_waits() == 1
    run = drive(run.pk)
    assert run.status == RunStatus.FAILED and run.error_code == "wait_timeout"
    refund = Step.objects.get(run=run, node="execute_refund")
    undo = Step.objects.get(run=run, node="undo:execute_refund")
    assert undo.parent_id == refund.pk and undo.status == StepStatus.SUCCEEDED
    assert undo.output == {"refund_id": refund.output["refund_id"], "status": "voided"}
