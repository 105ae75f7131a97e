"""The inbox in real Chromium, against a live ASGI server and real worker processes: a new
escalation appears without a reload, an operator answers it from the keyboard and the run
completes on screen; an edit with a contract error is shown in place, then fixed; a tier-1
operator cannot act on a tier-3 item."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestration.models import Run, Wait
from orchestration.services import run_submit
from tests.conftest import OPERATOR_PERMISSIONS, wait_for_run, wait_until
from tests.e2e.conftest import E2E, login
from tests.factories import UserFactory

pytestmark = E2E

TIER_1 = [
    p
    for p in OPERATOR_PERMISSIONS
    if p not in ("orchestration.decide_tier_2", "orchestration.decide_tier_3")
]


@pytest.fixture
def live_workers(start_worker: Callable[..., Any]) -> Any:
    return start_worker("e2e", SIGNALBOX_LIVE_EVENTS="true")


@pytest.fixture
def approval(live_workers: Any) -> Wait:
    """A content pipeline run by someone else, waiting at its approval (tier 1)."""
    requester = UserFactory(
        username="asker", permissions=["orchestration.add_run", "policies.submit_runs"]
    )
    run = run_submit(
        workflow="content_pipeline", input={"topic": "Queues"}, submitted_by=requester
    ).run
    return wait_until(
        lambda: Wait.objects.filter(run=run, kind="approval", status="open").first(),
        timeout=60,
        what="the approval",
    )


def test_a_new_escalation_appears_live_and_is_answered_by_keyboard(
    server: str, context: Any, live_workers: Any
) -> None:
    UserFactory(username="op", permissions=OPERATOR_PERMISSIONS)
    page = login(context, server, "op")
    page.goto(f"{server}/inbox/")
    page.wait_for_selector("text=live")
    assert page.locator("text=Nothing waits for a decision.").count() == 1

    run = run_submit(workflow="escalating", input={"fail_attempts": 2}, submitted_by=None).run
    wait = wait_until(
        lambda: Wait.objects.filter(run=run, kind="escalation", status="open").first(),
        timeout=30,
        what="the escalation",
    )
    page.wait_for_selector(f"#item-{wait.pk}", timeout=15000)  # no reload

    page.keyboard.press("j")
    page.keyboard.press("o")
    page.wait_for_url(f"{server}/inbox/{wait.pk}/")
    page.keyboard.press("a")  # retry
    page.wait_for_url(f"{server}/inbox/")
    assert wait_for_run(run.pk).status == "succeeded"
    page.goto(f"{server}/runs/{run.pk}/")
    page.wait_for_selector(".status-succeeded")
    assert page.refused == []


def test_edit_with_a_contract_error_is_shown_in_place_then_fixed(
    server: str, context: Any, approval: Wait
) -> None:
    UserFactory(username="op", permissions=OPERATOR_PERMISSIONS)
    page = login(context, server, "op")
    page.goto(f"{server}/inbox/{approval.pk}/")
    page.keyboard.press("e")
    page.fill("#field_topic", "")
    page.fill("#edit-reason", "retitle")
    page.click('#edit-form button[value="edit"]')
    page.wait_for_selector("#error_topic")
    assert page.locator("#field_topic").get_attribute("aria-invalid") == "true"
    page.fill("#field_topic", "Queues, revisited")
    page.fill("#edit-reason", "retitle")
    page.click('#edit-form button[value="edit"]')
    page.wait_for_url(f"{server}/inbox/")
    assert Wait.objects.get(pk=approval.pk).edited_input["topic"] == "Queues, revisited"
    assert wait_for_run(approval.run_id, timeout=60).status == "succeeded"


def test_a_tier_1_operator_cannot_act_on_a_tier_3_item(
    server: str, context: Any, approval: Wait
) -> None:
    UserFactory(username="junior", permissions=TIER_1)
    Wait.objects.filter(pk=approval.pk).update(tier=3)
    page = login(context, server, "junior")
    page.goto(f"{server}/inbox/")
    assert "Needs tier 3 · you hold tier 1" in page.inner_text(f"#item-{approval.pk}")
    page.goto(f"{server}/inbox/{approval.pk}/")
    assert page.locator('button[value="approve"]').count() == 0
    refused = page.inner_text("#not-actionable")
    assert "it needs tier 3 and you hold tier 1" in refused
    assert "Who can" in refused or "Nobody can decide it yet" in refused
    page.keyboard.press("a")  # nothing to press
    assert Run.objects.get(pk=approval.run_id).status == "waiting"
