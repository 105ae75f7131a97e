"""Every page in real Chromium: axe finds nothing serious or critical on any page an operator,
an admin, an auditor or a visitor who has not logged in can reach, in light and in dark mode
(error pages included); the run page's Plotly timeline renders under the CSP, which refuses
inline styles; the token page shows a new token once. Screenshots go to docs/screenshots/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from axe_playwright_python.base import AXE_SCRIPT

from orchestration.models import Wait
from orchestration.services import run_submit
from policies.roles import roles_sync
from policies.services import policy_activate, policy_draft, policy_review, policy_submit
from tests.conftest import OPERATOR_PERMISSIONS
from tests.e2e.conftest import E2E, csp_violations, shot, signed_in, watch
from tests.factories import UserFactory

pytestmark = E2E

POLICY = """default: allow
rules:
  - id: refund-tier-1
    description: Refunds above 100 need a tier-1 approval
    action: agent:refund_executor
    when:
      - {fact: params.amount, op: ">", value: 100}
    outcome: {decision: require_approval, tier: 1}
"""

#: What axe must not find. Moderate and minor findings are left to judgement.
BLOCKING = ("serious", "critical")


@pytest.fixture
def site(engine_in_process: None, drive: Callable[[int], Any]) -> dict[str, Any]:
    """Users of each role and something on every page: a finished run, an escalated one (an
    item in the inbox), an active policy with a newer draft, a token."""
    groups = roles_sync()
    operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
    admin = UserFactory(username="admin", is_staff=True)
    admin2 = UserFactory(username="admin2", is_staff=True)
    auditor = UserFactory(username="auditor")
    for user, role in ((admin, "Policy admin"), (admin2, "Policy admin"), (auditor, "Auditor")):
        user.groups.add(groups[role])
    done = drive(
        run_submit(workflow="slow_then_echo", input={"seconds": 0}, submitted_by=operator).run.pk
    )
    escalated = drive(
        run_submit(
            workflow="escalating", input={"fail_attempts": 2, "text": "hi"}, submitted_by=None
        ).run.pk
    )
    wait = Wait.objects.get(run=escalated, kind="escalation", status="open")
    refund = drive(
        run_submit(
            workflow="refund_desk",
            input={"message": "My headset arrived damaged. I would like a refund, please."},
            seed=1,
        ).run.pk
    )
    approval = Wait.objects.get(run=refund, kind="approval", status="open")
    version = policy_draft(source=POLICY, author=admin, note="first")
    policy_submit(version_id=version.pk, user=admin)
    policy_review(version_id=version.pk, user=admin2, approve=True)
    policy_activate(version_id=version.pk, user=admin2)
    draft = policy_draft(source=POLICY.replace("100", "50"), author=admin, note="stricter")
    return {
        "users": {"operator": operator, "admin": admin, "auditor": auditor},
        "escalation": wait,
        "approval": approval,
        "paths": [
            "/",
            "/runs/",
            f"/runs/{done.pk}/",
            f"/runs/{escalated.pk}/",
            "/inbox/",
            f"/inbox/{wait.pk}/",
            f"/inbox/{approval.pk}/",
            "/account/",
            "/account/tokens/",
            "/drills/",
            "/tools/",
            "/policies/",
            "/policies/default/",
            f"/policies/versions/{draft.pk}/",
            f"/policies/versions/{draft.pk}/simulate/",
            "/policies/default/edit/",
            "/policies/default/diff/",
            "/runs/999999/",  # 404
            "/no/such/page/",  # 404
        ],
    }


def _violations(page: Any, options: dict[str, Any] | None = None) -> list[str]:
    """axe's serious and critical findings on the page as it is (axe is added once per page)."""
    if not page.evaluate("typeof axe !== 'undefined'"):
        page.evaluate(AXE_SCRIPT)
    results = page.evaluate(
        "options => axe.run(document, options)",
        {"resultTypes": ["violations"], **(options or {})},
    )
    return [
        f"{violation['id']} ({violation['impact']}): {violation['help']} — "
        + "; ".join(str(node["target"][0]) for node in violation["nodes"][:3])
        for violation in results["violations"]
        if violation["impact"] in BLOCKING
    ]


@pytest.mark.parametrize("role", ["operator", "admin", "auditor", "visitor"])
def test_no_page_has_a_serious_accessibility_violation(
    role: str, server: str, context: Any, site: dict[str, Any]
) -> None:
    if role == "visitor":
        page = watch(context.new_page())
        paths = ["/accounts/login/", "/no/such/page/"]
    else:
        page = signed_in(context, server, site["users"][role])
        paths = site["paths"]
    found: list[str] = []
    statuses: dict[str, int] = {}
    for path in paths:
        response = page.goto(f"{server}{path}")
        status = response.status if response else 0
        if status in statuses.values() and status in (403, 404):
            continue  # one refusal page of each kind is enough
        statuses[path] = status
        page.wait_for_load_state("load")
        found += [f"{path} [{status}] refused: {text}" for text in page.refused]
        found += [f"{path} [{status}] CSP: {text}" for text in csp_violations(page)]
        page.refused.clear()
        page.emulate_media(color_scheme="light")
        found += [f"{path} [{status}, light] {v}" for v in _violations(page)]
        # Dark mode changes colours only.
        page.emulate_media(color_scheme="dark")
        found += [
            f"{path} [{status}, dark] {v}"
            for v in _violations(page, {"runOnly": {"type": "rule", "values": ["color-contrast"]}})
        ]
    assert 200 in statuses.values()
    assert found == [], "\n".join(found)


def test_home_and_the_inbox_show_what_waits_for_the_operator(
    server: str, context: Any, site: dict[str, Any]
) -> None:
    escalation, approval = site["escalation"], site["approval"]
    page = signed_in(context, server, site["users"]["operator"])
    page.goto(f"{server}/")
    page.wait_for_selector("[data-live-state].is-live")
    assert "escalating" in page.inner_text("main") and "refund_desk" in page.inner_text("main")
    shot(page, "home")
    page.goto(f"{server}/inbox/")
    page.wait_for_selector("[data-live-state].is-live")
    assert page.locator(f"#item-{escalation.pk}").count() == 1
    assert page.locator(f"#item-{approval.pk}").count() == 1
    shot(page, "inbox")
    page.goto(f"{server}/inbox/{approval.pk}/")
    assert page.locator('button[value="approve"]').count() == 1
    shot(page, "inbox-item")
    assert page.refused == []


def test_the_run_timeline_renders_under_the_csp(
    server: str, context: Any, engine_in_process: None, drive: Callable[[int], Any]
) -> None:
    operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
    run = drive(
        run_submit(
            workflow="research_brief",
            input={"question": "Why do queues need idempotent consumers?", "max_subquestions": 3},
            submitted_by=operator,
        ).run.pk
    )
    page = signed_in(context, server, operator)
    page.goto(f"{server}/runs/{run.pk}/")
    chart = page.locator("#run-timeline-chart svg.main-svg").first
    chart.wait_for()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["height"] > 100
    assert page.locator("#run-timeline-chart .trace.bars").count() > 0  # the bars are drawn
    # Plotly's own rules apply (from the linked sheet): its layers are stacked, not in a column.
    position = page.evaluate(
        "getComputedStyle(document.querySelector('#run-timeline-chart svg.main-svg')).position"
    )
    assert position == "absolute"
    assert page.locator("style").count() == 0  # nothing inline was even attempted
    assert csp_violations(page) == [] and page.refused == []
    # The top of the page: the summary, the graph and the timeline (the history runs on below).
    page.set_viewport_size({"width": 1280, "height": 1080})
    shot(page, "run", full_page=False)


def test_a_new_token_is_shown_once_and_listed(server: str, context: Any) -> None:
    operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
    page = signed_in(context, server, operator)
    page.goto(f"{server}/account/tokens/")
    assert page.locator("text=You have no tokens yet.").count() == 1
    page.fill("#token-name", "nightly import")
    page.get_by_role("button", name="Create token").click()
    page.wait_for_selector("#new-token")
    raw = page.locator("#raw-token").input_value()
    assert len(raw) > 20 and "nightly import" in page.inner_text("table")
    shot(page, "tokens")
    page.goto(f"{server}/account/tokens/")
    assert page.locator("#new-token").count() == 0 and raw not in page.content()
    assert page.refused == []
