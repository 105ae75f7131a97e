"""Agents call capabilities through the engine: records in the step's transaction, and a
side effect applied once even when the worker dies after causing it."""

from __future__ import annotations

import pytest

from orchestration import recovery
from orchestration.models import Step, ToolCall
from orchestration.services import run_submit
from tests.conftest import wait_for_run, wait_until
from tests.support.stub_provider import stub_provider_server

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def test_tool_calls_are_recorded_with_the_step_that_made_them(start_worker):
    with stub_provider_server("test-effect") as stub:
        start_worker("w", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        stub.reply_with(503)  # the first attempt fails, the retry succeeds
        run = wait_for_run(run_submit(workflow="refund_once", input={}).run.pk)
    assert run.status == "succeeded", run.error_message
    step = Step.objects.get(run=run, node="refund")
    calls = list(ToolCall.objects.filter(step=step).order_by("id"))
    assert [c.status for c in calls] == ["failed", "succeeded"]
    assert len({c.idempotency_key for c in calls}) == 1
    assert stub.effects_applied == 1


def test_a_worker_killed_after_a_side_effect_does_not_repeat_it(start_worker):
    with stub_provider_server("test-effect") as stub:
        doomed = start_worker("doomed", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        run = run_submit(workflow="refund_once", input={"seconds": 5}).run
        wait_until(lambda: stub.count >= 1, what="the refund request")
        doomed.kill()  # after the effect, before the step's result was committed
        start_worker("rescuer", concurrency=1, SIGNALBOX_TEST_ECHO_URL=stub.url)
        wait_until(
            lambda: recovery.reap_expired_leases(), timeout=10, interval=0.2, what="lease to expire"
        )
        run = wait_for_run(run.pk)
        assert run.status == "succeeded", run.error_message
        assert stub.count == 2  # the re-claimed step called again ...
        assert stub.effects_applied == 1  # ... with the same key, so the refund happened once
    step = Step.objects.get(run=run, node="refund")
    assert step.attempt == 2
    assert (
        ToolCall.objects.filter(step=step, status="succeeded").count() == 1
    )  # the dead attempt's record died with it
