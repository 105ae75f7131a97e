"""The inbox list by keyboard in real Chromium: j selects a row, c claims it (and the claim
appears without a reload), a opens the item's decision form with the reason focused and Enter
confirms; e opens the edit form at its first field; ? shows the keys; a claim that lapses is
marked expired on the list when its time is up."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.utils import timezone

from orchestration.models import Run, Wait, WaitClaim
from orchestration.services import run_submit, wait_claim
from tests.conftest import OPERATOR_PERMISSIONS
from tests.e2e.conftest import E2E, login
from tests.factories import UserFactory

pytestmark = E2E


def approvals(drive: Callable[[int], Run], count: int) -> list[Wait]:
    requester = UserFactory(
        username="asker", permissions=["orchestration.add_run", "policies.submit_runs"]
    )
    out = []
    for n in range(count):
        run = drive(
            run_submit(
                workflow="content_pipeline", input={"topic": f"Queues {n}"}, submitted_by=requester
            ).run.pk
        )
        out.append(Wait.objects.get(run=run, kind="approval", status="open"))
    return sorted(out, key=lambda w: (w.deadline_at, w.pk))


def test_the_inbox_list_is_worked_by_keyboard(
    server: str, context: Any, drive: Callable[[int], Run], engine_in_process: None
) -> None:
    first, second = approvals(drive, 2)
    UserFactory(username="op", permissions=OPERATOR_PERMISSIONS)
    page = login(context, server, "op")
    page.goto(f"{server}/inbox/")
    page.wait_for_selector("text=live")

    page.keyboard.press("?")
    assert page.is_visible("#keys-help") and "Enter" in page.inner_text("#keys-help")
    page.keyboard.press("Escape")
    assert not page.is_visible("#keys-help")

    page.keyboard.press("a")  # nothing selected yet: it says what to do
    assert "Select an item first" in page.inner_text("#keys-status")

    page.keyboard.press("j")
    page.keyboard.press("c")
    page.wait_for_selector("#keys-status:has-text('You claimed')")
    assert WaitClaim.objects.get(wait=first).user.username == "op"
    page.wait_for_selector(f"#item-{first.pk} .claim:has-text('claimed by op')")  # pushed live

    page.keyboard.press("a")
    page.wait_for_url(f"{server}/inbox/{first.pk}/")  # ?do=a is dropped from the address
    page.wait_for_selector("button.armed[value='approve']")
    assert page.evaluate("document.activeElement.id") == "reason"
    page.keyboard.type("checked the brief")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{server}/inbox/")
    decided = Wait.objects.get(pk=first.pk)
    assert (decided.decision, decided.decision_reason) == ("approve", "checked the brief")

    page.wait_for_selector(f"#item-{second.pk}")
    page.keyboard.press("j")
    page.keyboard.press("e")
    page.wait_for_url(f"{server}/inbox/{second.pk}/")
    page.wait_for_selector("#edit[open]")
    assert page.evaluate("document.activeElement.id") == "field_topic"
    assert Wait.objects.get(pk=second.pk).status == "open"  # opening the form decides nothing

    # Someone else's claim lapses by itself: the list says so when its time is up.
    other = UserFactory(username="other", permissions=OPERATOR_PERMISSIONS)
    wait_claim(wait_id=second.pk, user=other)
    WaitClaim.objects.filter(wait=second).update(expires_at=timezone.now() + timedelta(seconds=3))
    page.goto(f"{server}/inbox/")
    page.wait_for_selector(f"#item-{second.pk} .claim:has-text('claimed by other')")
    page.wait_for_selector(
        f"#item-{second.pk} .claim.expired:has-text('claim expired')", timeout=8000
    )
    assert page.refused == []  # nothing refused by the CSP, no script error
