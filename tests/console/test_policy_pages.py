"""The policy pages (issue 18, "Editing, review and simulation"): the editor shows a YAML error
at its line and refuses to save it; the forms edit the draft's YAML; review to active through
the version page; four eyes as a clear message; rollback; the diff names the changed rule; the
simulation page counts a crafted history; auditors read only; others get a 403 page; the
version list's query count is pinned."""

from __future__ import annotations

import html
import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from policies.facts import Facts
from policies.models import Policy, PolicyStatus, PolicyVersion
from policies.roles import roles_sync
from policies.services import policy_activate, policy_draft, policy_review, policy_submit
from tests.factories import PolicyDecisionFactory, UserFactory
from tests.policies.documents import REFUND_TIER_1 as V1
from tests.policies.documents import REFUND_TIER_1_RAISED as V2
from tests.policies.documents import REFUND_TIER_7 as BROKEN

pytestmark = pytest.mark.django_db


def _user(group: str | None, username: str) -> Any:
    user = UserFactory(username=username)
    if group is not None:
        user.groups.add(roles_sync()[group])
    return user


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def ada() -> Any:
    return _user("Policy admin", "ada")


@pytest.fixture
def bob() -> Any:
    return _user("Policy admin", "bob")


def _text(response: Any) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", response.content.decode())))


def _live(source: str, author: Any, reviewer: Any) -> PolicyVersion:
    version = policy_draft(source=source, author=author, note="why")
    policy_submit(version_id=version.pk, user=author)
    policy_review(version_id=version.pk, user=reviewer, approve=True, note="fine")
    return policy_activate(version_id=version.pk, user=reviewer)


def test_the_editor_shows_a_yaml_error_at_its_line_and_will_not_save_it(ada: Any) -> None:
    client = _client(ada)
    url = reverse("console:policy_edit", args=["default"])
    checked = client.post(url, {"source": BROKEN, "intent": "check"})
    assert checked.status_code == 422
    page_html = checked.content.decode()
    # The problem is rendered inside line 8's item, next to the text of that line.
    line = re.search(r'<li id="line-8" class="source-line has-problem">(.*?)</li>', page_html, re.S)
    assert line is not None
    assert "outcome: {decision: require_approval, tier: 7}" in line.group(1)
    assert "line 8, column" in line.group(1) and "rules[0].outcome.tier" in line.group(1)
    assert 'data-problem-lines="8"' in page_html
    saved = client.post(url, {"source": BROKEN, "intent": "save", "note": "x"})
    assert saved.status_code == 422 and "The draft was not saved" in _text(saved)
    assert not PolicyVersion.objects.exists()


def test_the_editor_saves_a_valid_draft_and_the_version_page_shows_its_rules(ada: Any) -> None:
    client = _client(ada)
    response = client.post(
        reverse("console:policy_edit", args=["default"]),
        {"source": V1, "intent": "save", "note": "refunds need a person"},
    )
    version = PolicyVersion.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse(
        "console:policy_version", args=[version.pk]
    )
    page = _text(client.get(response["Location"]))
    assert "agent:refund_executor when params.amount > 100: require_approval tier 1, sla 1d" in page
    assert "refunds need a person" in page and "Submit for review" in page
    assert "drafted by ada" in page


def test_an_approval_rule_form_adds_a_rule_to_the_yaml(ada: Any) -> None:
    response = _client(ada).post(
        reverse("console:policy_edit", args=["default"]),
        {
            "source": V1,
            "intent": "apply:rules",
            "rules-id": "refund-tier-2",
            "rules-description": "Refunds above 1,000 need tier 2",
            "rules-action": "agent:refund_executor, tool:issue_refund",
            "rules-fact": "params.amount",
            "rules-op": ">",
            "rules-threshold": "1000",
            "rules-tier": "2",
            "rules-quorum": "1",
            "rules-sla": "8h",
        },
    )
    assert response.status_code == 200
    source = response.context["source"]
    assert "id: refund-tier-2" in source and "tier: 2" in source and "value: 1000" in source
    assert "action: ['agent:refund_executor', 'tool:issue_refund']" in source
    assert response.context["problems"] == []


@pytest.mark.parametrize(
    ("section", "fields", "expected"),
    [
        (
            "allowlists",
            {"name": "partners", "kind": "domains", "entries": "example.com\n*.example.org"},
            "partners:\n    kind: domains",
        ),
        (
            "ceilings",
            {"scope": "workflow_day", "key": "refund_desk", "limit": "3.5", "soft_ratio": "0.8"},
            "scope: workflow_day",
        ),
        (
            "time_windows",
            {
                "name": "office",
                "days": "mon-fri",
                "start": "09:00",
                "end": "18:00",
                "zone": "Europe/Berlin",
                "applies_to": "tool:send_email",
                "outside": "require_approval",
                "outside_tier": "2",
            },
            "zone: Europe/Berlin",
        ),
        (
            "rate_limits",
            {
                "id": "emails",
                "action": "tool:send_email",
                "per": "tenant",
                "limit": "30",
                "period": "1m",
            },
            "id: emails",
        ),
    ],
)
def test_each_form_edits_the_draft_yaml(
    ada: Any, section: str, fields: dict[str, str], expected: str
) -> None:
    data = {
        "source": V1,
        "intent": f"apply:{section}",
        **{f"{section}-{k}": v for k, v in fields.items()},
    }
    response = _client(ada).post(reverse("console:policy_edit", args=["default"]), data)
    assert response.status_code == 200, response.context.get("form_problems")
    assert expected in response.context["source"]
    assert response.context["problems"] == []


def test_a_form_that_would_break_the_document_says_why_and_leaves_the_yaml(ada: Any) -> None:
    response = _client(ada).post(
        reverse("console:policy_edit", args=["default"]),
        {
            "source": V1,
            "intent": "apply:time_windows",
            "time_windows-name": "night",
            "time_windows-days": "mon",
            "time_windows-start": "09:00",
            "time_windows-end": "09:00",
            "time_windows-zone": "UTC",
            "time_windows-outside_tier": "2",
        },
    )
    assert response.status_code == 422
    assert any("end must differ from start" in p for p in response.context["form_problems"])
    assert response.context["source"] == V1


def test_an_existing_rule_loads_into_its_form(ada: Any) -> None:
    response = _client(ada).post(
        reverse("console:policy_edit", args=["default"]),
        {"source": V1, "intent": "load:rules:refund-tier-1"},
    )
    [form] = [f for f in response.context["forms"] if f.section == "rules"]
    assert form.initial["id"] == "refund-tier-1" and form.initial["threshold"] == 100
    assert form.initial["tier"] == 1


def test_review_to_active_through_the_version_page_with_four_eyes(ada: Any, bob: Any) -> None:
    version = policy_draft(source=V1, author=ada, note="first")
    author, reviewer = _client(ada), _client(bob)
    action = lambda name: reverse("console:policy_version_action", args=[version.pk, name])  # noqa: E731
    assert author.post(action("submit")).status_code == 302
    page = reverse("console:policy_version", args=[version.pk])
    # Its author is told who acts next and offered no button the rule would refuse.
    mine = author.get(page).content.decode()
    assert "another policy admin must review and activate it" in mine
    assert ">Approve</button>" not in mine and ">Reject</button>" not in mine
    assert ">Approve</button>" in reviewer.get(page).content.decode()
    refused = author.post(action("approve"), {"note": ""})
    assert refused.status_code == 403
    assert "you wrote this version: another admin must review it" in _text(refused)
    no_reason = reviewer.post(action("reject"), {"note": ""})
    assert no_reason.status_code == 422 and "say why the version is rejected" in _text(no_reason)
    assert reviewer.post(action("approve"), {"note": "checked"}).status_code == 302
    mine = author.get(page).content.decode()
    assert "another policy admin must activate it" in mine and ">Activate</button>" not in mine
    assert ">Activate</button>" in reviewer.get(page).content.decode()
    refused = author.post(action("activate"))
    assert refused.status_code == 403 and "another admin must activate it" in _text(refused)
    activated = reviewer.post(action("activate"), {"note": "go"}, follow=True)
    assert "Activated: the engine enforces this version from now on." in _text(activated)
    version.refresh_from_db()
    assert version.status == PolicyStatus.ACTIVE and version.activated_by == bob


def test_rollback_from_the_version_page_needs_a_reason(ada: Any, bob: Any) -> None:
    first = _live(V1, ada, bob)
    _live(V2, ada, bob)
    url = reverse("console:policy_version_action", args=[first.pk, "rollback"])
    page = _text(_client(bob).get(reverse("console:policy_version", args=[first.pk])))
    assert "Roll back to v1" in page
    assert _client(bob).post(url, {"note": ""}).status_code == 422
    assert _client(bob).post(url, {"note": "v2 blocks the desk"}).status_code == 302
    assert Policy.objects.get().active_version_id == first.pk


def test_a_version_page_says_what_it_changes_from_the_active_version(ada: Any, bob: Any) -> None:
    _live(V1, ada, bob)
    draft = policy_draft(source=V2, author=ada)
    page = _text(_client(bob).get(reverse("console:policy_version", args=[draft.pk])))
    assert "What it changes from the active version rule refund-tier-1: tier 1 -> 2" in page


def test_the_diff_page_shows_the_changed_rule(ada: Any, bob: Any) -> None:
    first, second = policy_draft(source=V1, author=ada), policy_draft(source=V2, author=ada)
    response = _client(bob).get(
        reverse("console:policy_diff", args=["default"]), {"from": first.pk, "to": second.pk}
    )
    page = _text(response)
    assert "rule refund-tier-1: tier 1 -> 2" in page
    assert (
        '<span class="diff-del">-      tier: 1</span><span class="diff-add">+      tier: 2</span>'
        in (response.content.decode())
    )


def test_the_simulation_page_counts_a_crafted_history(ada: Any, bob: Any) -> None:
    _live(V1, ada, bob)
    draft = policy_draft(source=V2, author=ada)
    now = timezone.now()
    facts = lambda amount: Facts("agent:refund_executor", params={"amount": amount}).to_json()  # noqa: E731
    for n in range(37):
        PolicyDecisionFactory(
            facts=facts(250),
            outcome="approve",
            tier=1,
            rule="refund-tier-1",
            run_id=500 + n,
            created_at=now - timedelta(hours=n + 1),
        )
    for _ in range(4):
        PolicyDecisionFactory(facts=facts(20), created_at=now - timedelta(days=3))
    PolicyDecisionFactory(facts=facts(250), created_at=now - timedelta(days=20))  # outside 7 days

    response = _client(bob).get(reverse("console:policy_simulate", args=[draft.pk]), {"days": 7})
    assert response.status_code == 200
    page = _text(response)
    assert "37 of 41 actions would be decided differently" in page
    assert (
        "37 agent:refund_executor actions that needed a tier-1 approval would require a tier-2 approval "
        "(rule refund-tier-1)"
    ) in page
    page_html = response.content.decode()
    assert (
        len(re.findall(r'href="/runs/\d+/"', page_html)) == 5 and 'href="/runs/536/"' in page_html
    )  # the earliest five, linked
    [change] = response.context["changes"]
    assert change["change"].count == 37


def test_an_auditor_reads_but_sees_no_write_actions_and_cannot_post_them(ada: Any) -> None:
    auditor = _user("Auditor", "audrey")
    version = policy_draft(source=V1, author=ada)
    client = _client(auditor)
    page = client.get(reverse("console:policy_version", args=[version.pk]))
    assert (
        page.status_code == 200
        and "Submit for review" not in _text(page)
        and "New draft" not in _text(page)
    )
    refused = client.post(reverse("console:policy_version_action", args=[version.pk, "submit"]))
    assert refused.status_code == 403 and "only policy admins" in _text(refused)
    assert client.get(reverse("console:policy_edit", args=["default"])).status_code == 403
    assert PolicyVersion.objects.get().status == PolicyStatus.DRAFT
    assert "Policies" in _text(client.get(reverse("console:policy_list")))


def test_the_policy_list_says_what_the_policy_in_force_describes(ada: Any, bob: Any) -> None:
    described = "description: Refund desk rules\n" + V1
    _live(described, ada, bob)
    row = _text(_client(bob).get(reverse("console:policy_list")))
    assert "Refund desk rules" in row


def test_an_operator_gets_a_clear_403_page_and_no_nav_link() -> None:
    operator = _user("Operator tier 2", "otto")
    client = _client(operator)
    response = client.get(reverse("console:policy_list"))
    assert response.status_code == 403
    assert "you may not read policies (policy admins and auditors may)" in _text(response)
    assert (
        reverse("console:policy_list")
        not in client.get(reverse("console:run_list")).content.decode()
    )


def test_the_version_list_has_a_fixed_number_of_queries(
    ada: Any, bob: Any, django_assert_num_queries: Any
) -> None:
    _live(V1, ada, bob)
    client = _client(bob)
    url = reverse("console:policy_versions", args=["default"])
    client.get(url)
    with django_assert_num_queries(5):
        small = client.get(url)
    for n in range(12):
        version = policy_draft(source=V2, author=ada, note=f"try {n}")
        policy_submit(version_id=version.pk, user=ada)
        policy_review(version_id=version.pk, user=bob, approve=False, note="no")
    with django_assert_num_queries(5):
        large = client.get(url)
    assert _text(small).count("v1") >= 1 and "try 11" in _text(large)
    assert large.content.decode().count('class="status policy-status-rejected"') == 12


def test_bad_simulation_days_and_unknown_versions_are_clear_4xx(ada: Any) -> None:
    draft = policy_draft(source=V1, author=ada)
    client = _client(ada)
    too_far = client.get(reverse("console:policy_simulate", args=[draft.pk]), {"days": 500})
    assert too_far.status_code == 400 and "days must be from 1 to 90" in _text(too_far)
    assert client.get(reverse("console:policy_version", args=[draft.pk + 1000])).status_code == 404
    assert client.get(reverse("console:policy_versions", args=["nope"])).status_code == 404
    action = reverse("console:policy_version_action", args=[draft.pk, "explode"])
    assert client.post(action).status_code == 404
