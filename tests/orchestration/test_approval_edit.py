"""Edit-then-approve: the edited action is what executes *and* what the run records; every
later step sees it (a new state version, written by the person who edited)."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.models import StateVersion, Step, Wait
from orchestration.services import approval_decide, run_send_event, run_submit

pytestmark = pytest.mark.django_db


def test_an_edited_refund_is_what_executes_what_the_run_records_and_what_the_customer_is_told(
    drive: Any, operator: Any, fast_agents: None
) -> None:
    message = "My headset arrived damaged. I would like a refund, please."
    run = drive(run_submit(workflow="refund_desk", input={"message": message}, seed=1).run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    proposed = run.state["proposal"]
    assert proposed["amount"] > 100  # above the threshold: it waited for a person

    approval_decide(
        wait_id=wait.pk,
        user=operator,
        decision="edit",
        reason="partial refund agreed with the customer",
        edited_input={"proposal": {**proposed, "amount": 99.0}},
    )
    run = drive(run.pk)
    run_send_event(
        run_id=run.pk,
        name="payment.settled",
        event_id="settle-1",
        payload={"ok": True},
        user=operator,
    )
    run = drive(run.pk)

    assert run.status == "succeeded", run.error_message
    executed = Step.objects.get(run=run, node="execute_refund")
    assert executed.input["proposal"]["amount"] == 99.0 and executed.input_override is None
    assert run.state["proposal"]["amount"] == 99.0
    versions = list(
        StateVersion.objects.filter(run=run, key="proposal")
        .order_by("version")
        .values_list("version", "writer")
    )
    assert versions == [(1, "refund_proposer"), (2, "operator:operator")]
    body = Step.objects.get(run=run, node="notify_customer").output["body"]
    assert "99.00 EUR" in body and f"{proposed['amount']:.2f}" not in body
