"""The decision inbox: who may act on what, claims, edits checked against the contract,
bulk approval, second decisions, and its query count."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from console.readable import error_fields, readable_rows, schema_example, truncated
from orchestration.errors import Conflict
from orchestration.models import Run, Wait, WaitClaim
from orchestration.selectors import inbox_for_user, wait_sla_due
from orchestration.services import approvals_decide_bulk, run_submit, wait_claim
from tests.conftest import OPERATOR_PERMISSIONS
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

TIER_1 = [
    p
    for p in OPERATOR_PERMISSIONS
    if p not in ("orchestration.decide_tier_2", "orchestration.decide_tier_3")
]


def pending_approval(
    requester: Any, drive: Callable[[int], Run], topic: str = "Durable queues"
) -> Wait:
    run = drive(
        run_submit(
            workflow="content_pipeline", input={"topic": topic}, submitted_by=requester
        ).run.pk
    )
    assert run.status == "waiting"
    return Wait.objects.get(run=run, kind="approval", status="open")


def escalation(drive: Callable[[int], Run]) -> Wait:
    run = drive(
        run_submit(workflow="escalating", input={"fail_attempts": 2}, submitted_by=None).run.pk
    )
    return Wait.objects.get(run=run, kind="escalation", status="open")


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_inbox_lists_approvals_and_escalations_soonest_deadline_first(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    approval = pending_approval(requester, drive)
    escalated = escalation(drive)
    items = inbox_for_user(operator)
    assert [i.wait.pk for i in items] == sorted(
        [approval.pk, escalated.pk], key=lambda pk: (wait_sla_due(Wait.objects.get(pk=pk)), pk)
    )
    assert all(i.actionable for i in items)
    # Ordered by the due time each shows (its SLA), not by when it finally expires: an item
    # that expires first but is due later comes second.
    now = timezone.now()
    Wait.objects.filter(pk=approval.pk).update(
        sla_due_at=now + timedelta(minutes=50), deadline_at=now + timedelta(hours=1)
    )
    Wait.objects.filter(pk=escalated.pk).update(
        created_at=now, sla_due_at=None, deadline_at=now + timedelta(hours=24)
    )
    items = inbox_for_user(operator)
    assert [i.wait.pk for i in items] == [escalated.pk, approval.pk]
    assert items[0].sla_due_at < items[1].sla_due_at
    # A tier-3 item climbs no higher: due when it expires.
    Wait.objects.filter(pk=escalated.pk).update(tier=3)
    assert [i.wait.pk for i in inbox_for_user(operator)] == [approval.pk, escalated.pk]

    html = logged_in(operator).get("/inbox/").content.decode()
    assert f'id="item-{approval.pk}"' in html and f'id="item-{escalated.pk}"' in html
    assert 'ws-connect="/ws/inbox/"' in html
    assert 'data-deadline="' in html and "/static/console/inbox.js" in html
    assert "<script>" not in html  # no inline scripts (CSP)


def test_a_long_reason_is_cut_in_the_list_and_whole_on_hover(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    short, long = pending_approval(requester, drive), pending_approval(requester, drive)
    reason = (
        "Refunds above 1,000 need a tier-2 approval: params.proposal.amount is 1938.0, "
        "> 1000 (rule refund-tier-2)"
    )
    Wait.objects.filter(pk=long.pk).update(reason=reason)
    html = logged_in(operator).get("/inbox/").content.decode()
    assert f'<span title="{reason}">{reason[:79]}…</span>' in html.replace("&gt;", ">")
    assert f"· {short.reason}\n" in html and f'title="{short.reason}"' not in html


def test_items_above_the_users_tier_are_visible_but_not_actionable(
    requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    Wait.objects.filter(pk=wait.pk).update(tier=3)
    junior = UserFactory(username="junior", permissions=TIER_1)
    (item,) = inbox_for_user(junior)
    assert not item.actionable and "needs tier 3" in item.who_can_act
    assert "you hold tier 1" in (item.refusal or "")

    assert item.refusal_line == "Needs tier 3 · you hold tier 1"

    client = logged_in(junior)
    assert "Needs tier 3 · you hold tier 1" in client.get("/inbox/").content.decode()
    page = client.get(f"/inbox/{wait.pk}/").content.decode()
    assert 'id="not-actionable"' in page
    assert "You can't decide this approval: it needs tier 3 and you hold tier 1." in page.replace(
        "&#x27;", "'"
    )
    # Nobody holds tier 3 yet: the page says so, and who grants it.
    assert "Nobody can decide it yet" in page
    assert 'value="approve"' not in page
    # It names the people who can: tier 3 with the permissions, active, not the submitter.
    UserFactory(username="senior", permissions=OPERATOR_PERMISSIONS)
    UserFactory(username="retired", permissions=OPERATOR_PERMISSIONS, is_active=False)
    requester.user_permissions.add(  # as much as senior; but they submitted the run
        *(
            Permission.objects.get(content_type__app_label=app, codename=codename)
            for app, _, codename in (p.partition(".") for p in OPERATOR_PERMISSIONS)
        )
    )
    page = client.get(f"/inbox/{wait.pk}/").content.decode()
    who = re.search(r'<p id="deciders">(.*?)</p>', page, re.S)
    assert who is not None and who.group(1) == "Who can: <strong>senior</strong>."
    response = client.post(f"/inbox/{wait.pk}/", {"op": "approve", "reason": "looks fine"})
    assert response.status_code == 403
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_own_run_and_viewer_are_not_actionable(
    operator: Any, viewer: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(operator, drive)  # the operator submitted it
    (mine,) = inbox_for_user(operator)
    assert not mine.actionable and "someone else must approve" in (mine.refusal or "")
    (theirs,) = inbox_for_user(viewer)
    assert not theirs.actionable
    assert logged_in(viewer).post(f"/inbox/{wait.pk}/", {"op": "approve"}).status_code == 403


def test_someone_who_holds_no_tier_reads_the_inbox_with_no_decision_controls(
    operator: Any, viewer: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    page = logged_in(viewer).get("/inbox/").content.decode()
    assert f"#{wait.pk}" in page
    assert "you can read these items, not decide them" in page
    assert "Approve checked" not in page and 'name="wait"' not in page
    # An operator who may decide it gets the checkbox and the bulk buttons.
    page = logged_in(operator).get("/inbox/").content.decode()
    assert "Approve checked" in page and f'name="wait" value="{wait.pk}"' in page
    assert "you can read these items" not in page


def test_a_user_who_may_not_see_the_run_gets_404(
    requester: Any, stranger: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    assert inbox_for_user(stranger) == []
    assert logged_in(stranger).get(f"/inbox/{wait.pk}/").status_code == 404


def test_a_claim_shows_who_and_until_when_and_conflicts_for_others(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    other = UserFactory(username="other", permissions=OPERATOR_PERMISSIONS)
    assert logged_in(operator).post(f"/inbox/{wait.pk}/", {"op": "claim"}).status_code == 302
    claim = WaitClaim.objects.get(wait=wait)
    assert claim.user == operator

    page = logged_in(other).get(f"/inbox/{wait.pk}/").content.decode()
    assert "Claimed by operator until" in page
    with pytest.raises(Conflict, match="claimed by operator"):
        wait_claim(wait_id=wait.pk, user=other)
    response = logged_in(other).post(f"/inbox/{wait.pk}/", {"op": "claim"})
    assert response.status_code == 409 and "claimed by operator" in response.content.decode()

    logged_in(operator).post(f"/inbox/{wait.pk}/", {"op": "release"})
    assert not WaitClaim.objects.filter(wait=wait).exists()
    wait_claim(wait_id=wait.pk, user=other)
    verbs = list(
        AuditEvent.objects.filter(object_type="wait", object_id=wait.pk).values_list(
            "verb", flat=True
        )
    )
    assert verbs.count(Verb.WAIT_CLAIMED) == 2 and verbs.count(Verb.WAIT_RELEASED) == 1


def test_approve_from_the_item_page_then_a_second_decision_says_who_decided(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    other = UserFactory(username="other", permissions=OPERATOR_PERMISSIONS)
    response = logged_in(operator).post(f"/inbox/{wait.pk}/", {"op": "approve", "reason": "fine"})
    assert response.status_code == 302 and response["Location"] == "/inbox/"
    assert Wait.objects.get(pk=wait.pk).status == "approved"

    response = logged_in(other).post(f"/inbox/{wait.pk}/", {"op": "reject", "reason": "no"})
    assert response.status_code == 409
    html = response.content.decode()
    assert "already approved (approve by operator at" in html
    assert 'id="already-decided"' in html and "by operator at" in html


def test_after_a_decision_the_inbox_says_what_was_done(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    client = logged_in(operator)
    approved, rejected = pending_approval(requester, drive), pending_approval(requester, drive)
    stuck = escalation(drive)
    for wait, op in ((approved, "approve"), (rejected, "reject"), (stuck, "retry")):
        response = client.post(f"/inbox/{wait.pk}/", {"op": op, "reason": "checked"}, follow=True)
        assert response.status_code == 200
        notice = re.search(
            r'<p class="notice notice-success">([^<]*)</p>', response.content.decode()
        )
        assert notice is not None, op
        shown = notice.group(1).replace("&#x27;", "'")
        done = {"approve": "approved.", "reject": "rejected.", "retry": "sent back to be retried."}
        assert shown.startswith(f"{wait.kind.capitalize()} #{wait.pk} (") and shown.endswith(
            done[op]
        ), shown
        assert f"run #{wait.run_id})" in shown
        # shown once: the next page has no notice
        assert "notice-success" not in client.get("/inbox/").content.decode()


def test_a_vote_on_an_approval_that_needs_two_people_says_it_waits_for_another(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    Wait.objects.filter(pk=wait.pk).update(quorum=2)
    response = logged_in(operator).post(
        f"/inbox/{wait.pk}/", {"op": "approve", "reason": "fine by me"}, follow=True
    )
    html = response.content.decode().replace("&#x27;", "'")
    assert "your approval is recorded; it needs another person's before the run goes on" in html
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_edit_with_a_contract_error_is_shown_next_to_the_field_then_fixed(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    wait = pending_approval(requester, drive)
    client = logged_in(operator)
    page = client.get(f"/inbox/{wait.pk}/").content.decode()
    # the form is generated from the publisher's input contract
    for name in ("topic", "draft", "category"):
        assert f'name="field_{name}"' in page

    draft = wait.action["input"]["draft"]
    response = client.post(
        f"/inbox/{wait.pk}/",
        {
            "op": "edit",
            "field_topic": "",
            "field_draft": draft,
            "field_category": "ops",
            "reason": "retitle",
        },
    )
    assert response.status_code == 422
    html = response.content.decode()
    assert re.search(r'id="field_topic"[^>]*aria-invalid="true"', html)
    assert 'id="error_topic"' in html
    assert "Field required" in html or "at least 1 character" in html
    assert Wait.objects.get(pk=wait.pk).status == "open"

    response = client.post(
        f"/inbox/{wait.pk}/",
        {
            "op": "edit",
            "field_topic": "Queues, revisited",
            "field_draft": draft,
            "field_category": "ops",
            "reason": "retitle",
        },
    )
    assert response.status_code == 302
    decided = Wait.objects.get(pk=wait.pk)
    assert decided.decision == "edit" and decided.edited_input["topic"] == "Queues, revisited"


def test_escalation_retry_skip_with_contract_error_and_abort(
    operator: Any, drive: Callable[[int], Run]
) -> None:
    client = logged_in(operator)
    first = escalation(drive)
    response = client.post(
        f"/inbox/{first.pk}/", {"op": "skip", "skip_value": '{"text": {"not": "text"}}'}
    )
    assert response.status_code == 422 and 'id="error_skip_value"' in response.content.decode()
    assert (
        client.post(f"/inbox/{first.pk}/", {"op": "retry", "reason": "try again"}).status_code
        == 302
    )
    assert Wait.objects.get(pk=first.pk).decision == "retry"

    second = escalation(drive)
    assert (
        client.post(f"/inbox/{second.pk}/", {"op": "abort", "reason": "give up"}).status_code == 302
    )
    assert Run.objects.get(pk=second.run_id).status in ("failed", "compensating")


def test_bulk_approve_decides_each_and_reports_per_item(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    a = pending_approval(requester, drive, "One")
    b = pending_approval(requester, drive, "Two")
    approvals_decide_bulk(wait_ids=[a.pk], user=operator, reason="first")
    outcomes = approvals_decide_bulk(wait_ids=[a.pk, b.pk], user=operator, reason="batch")
    assert [(o.wait_id, o.ok) for o in outcomes] == [(a.pk, False), (b.pk, True)]
    assert outcomes[0].code == "already_decided"

    c = pending_approval(requester, drive, "Three")
    client = logged_in(operator)
    response = client.post("/inbox/bulk/", {"wait": [c.pk], "reason": "ok", "decision": "approve"})
    assert response.status_code == 302
    page = client.get("/inbox/").content.decode()
    assert f"#{c.pk}: decided" in page
    assert Wait.objects.get(pk=c.pk).status == "approved"


def test_bulk_refuses_mixed_tiers(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    a = pending_approval(requester, drive, "One")
    b = pending_approval(requester, drive, "Two")
    Wait.objects.filter(pk=b.pk).update(tier=2)
    response = logged_in(operator).post("/inbox/bulk/", {"wait": [a.pk, b.pk], "reason": "x"})
    assert response.status_code == 400 and "one tier" in response.content.decode()


def test_inbox_query_count_does_not_grow_with_items(
    operator: Any, requester: Any, drive: Callable[[int], Run], django_assert_num_queries: Any
) -> None:
    client = logged_in(operator)
    pending_approval(requester, drive, "One")
    # session, user, permissions, the open waits (with run, step and claim), the tier roles,
    # the catch-up mark
    with django_assert_num_queries(6):
        assert client.get("/inbox/").status_code == 200
    for topic in ("Two", "Three", "Four"):
        pending_approval(requester, drive, topic)
    escalation(drive)
    with django_assert_num_queries(6):
        assert client.get("/inbox/").status_code == 200


def test_a_long_inbox_is_paged_with_honest_counts(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    first = pending_approval(requester, drive, "One")
    # 59 more open items on the same run, each due a minute later than the one before.
    for minutes in range(1, 60):
        copy = Wait.objects.get(pk=first.pk)
        copy.pk = None
        copy.deadline_at = first.deadline_at + timedelta(minutes=minutes)
        copy.save()
    client = logged_in(operator)
    html = client.get("/inbox/").content.decode()
    assert html.count('class="inbox-item') == 50
    assert "1\u201350 of 60, soonest deadline first" in html and "page=2" in html
    assert f'id="item-{first.pk}"' in html  # the soonest deadline leads
    html = client.get("/inbox/?page=2").content.decode()
    assert html.count('class="inbox-item') == 10
    assert "51\u201360 of 60" in html and "page=1" in html and "page=3" not in html
    assert 'ws-connect="/ws/inbox/?page=2"' in html  # live updates keep the page
    # A page past the end is empty, not an error.
    assert client.get("/inbox/?page=99").status_code == 200


def test_an_items_action_reads_as_fields_and_a_cut_input_as_text(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:

    wait = pending_approval(requester, drive, topic="Durable queues")
    page = logged_in(operator).get(f"/inbox/{wait.pk}/").content.decode()
    fields = re.search(r'<dl class="fields" id="action-fields">(.*?)</dl>', page, re.S)
    assert fields is not None and "Durable queues" in fields.group(1)
    assert "<summary>As JSON</summary>" in page

    rows = readable_rows(
        {"proposal": {"amount": 12.5, "order_id": "o1"}, "tags": ["a"], "urgent": True, "x": None}
    )
    assert [(r["label"], r["depth"], r["value"]) for r in rows] == [
        ("proposal", 0, None),
        ("amount", 1, "12.5"),
        ("order id", 1, "o1"),
        ("tags", 0, '["a"]'),
        ("urgent", 0, "true"),
        ("x", 0, "—"),
    ]
    assert readable_rows(["not", "an", "object"]) == []
    assert truncated({"truncated": True, "size": 37227, "head": '{"message": "Every'}) == {
        "size": 37227,
        "head": '{"message": "Every',
        "shown": 18,
    }
    assert truncated({"truncated": True, "note": "an agent's own field"}) is None

    schema = {
        "properties": {
            "proposal": {"$ref": "#/$defs/Proposal"},
            "kind": {"enum": ["refund", "credit"]},
            "count": {"type": "integer", "default": 1},
        },
        "$defs": {"Proposal": {"properties": {"amount": {"type": "number"}}}},
    }
    assert schema_example(schema) == '{"proposal": {"amount": 0}, "kind": "refund", "count": 1}'
    assert schema_example({"type": "string"}) == ""

    error = {
        "code": "input_contract",
        "detail": [{"loc": ["order", "currency"], "msg": "Input should be a valid string"}],
    }
    assert error_fields(error) == [
        {"field": "order.currency", "message": "Input should be a valid string"}
    ]
    assert error_fields({"code": "boom", "detail": {"detail": [{"loc": [], "msg": "m"}]}}) == [
        {"field": "(the whole value)", "message": "m"}
    ]
    assert error_fields({"code": "timeout", "detail": {"seconds": 3}}) == []
