"""The policy editor in real Chromium: line numbers beside the YAML, the line with a problem
marked after "Check", the forms carrying what was typed, no script refused by the CSP, and no
serious accessibility violation (axe) on the editor, a version and the simulation page."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe
from django.conf import settings
from django.test import Client
from playwright.sync_api import sync_playwright

from policies.facts import Facts
from policies.roles import roles_sync
from policies.services import policy_activate, policy_draft, policy_review, policy_submit
from tests.factories import PolicyDecisionFactory, UserFactory
from tests.policies.documents import REFUND_TIER_1 as V1
from tests.policies.documents import REFUND_TIER_7 as BROKEN

# Sync Playwright runs an event loop in this thread; Django's ORM calls from the test are fine.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


def _page_as(browser: Any, live_server: Any, user: Any) -> Any:
    client = Client()
    client.force_login(user)
    context = browser.new_context()
    context.add_cookies(
        [
            {
                "name": settings.SESSION_COOKIE_NAME,
                "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                "url": live_server.url,
            }
        ]
    )
    page = context.new_page()
    page.refused = []  # CSP refusals and script errors (a 422 answer to "Check" is expected)
    page.on(
        "console",
        lambda message: (
            "Content Security Policy" in message.text and page.refused.append(message.text)
        ),
    )
    page.on("pageerror", lambda error: page.refused.append(str(error)))
    return page


def _shot(page: Any, name: str) -> None:
    """A full-page screenshot when POLICY_SCREENSHOTS names a folder (for reviewing the pages)."""
    folder = os.environ.get("POLICY_SCREENSHOTS")
    if folder:
        page.screenshot(path=os.path.join(folder, f"{name}.png"), full_page=True)


def _serious(page: Any) -> list[str]:
    results = Axe().run(page)
    return [
        f"{violation['id']}: {violation['help']}"
        for violation in results.response["violations"]
        if violation["impact"] in ("serious", "critical")
    ]


def test_the_editor_marks_the_problem_line_and_passes_axe(browser: Any, live_server: Any) -> None:
    groups = roles_sync()
    ada, bob = UserFactory(username="ada"), UserFactory(username="bob")
    for user in (ada, bob):
        user.groups.add(groups["Policy admin"])
    version = policy_draft(source=V1, author=ada, note="first")
    policy_submit(version_id=version.pk, user=ada)
    policy_review(version_id=version.pk, user=bob, approve=True)
    policy_activate(version_id=version.pk, user=bob)
    draft = policy_draft(source=V1.replace("value: 100", "value: 50"), author=ada, note="stricter")
    for n, amount in enumerate((60, 75, 20, 250)):
        facts = Facts(
            "agent:refund_executor", workflow="refund_desk", params={"amount": amount}
        ).to_json()
        PolicyDecisionFactory(
            facts=facts,
            run_id=100 + n,
            outcome="approve" if amount > 100 else "allow",
            tier=1 if amount > 100 else 0,
        )

    page = _page_as(browser, live_server, ada)
    page.goto(f"{live_server.url}/policies/default/edit/")
    assert page.locator("#policy-gutter span").count() == V1.count("\n") + 1
    page.fill("#policy-source", BROKEN)
    page.get_by_role("button", name="Check").click()
    page.wait_for_selector("#policy-problems")
    marked = page.locator("#policy-gutter span.gutter-problem")
    assert marked.count() == 1 and marked.inner_text() == "8"
    assert "rules[0].outcome.tier" in page.locator("#line-8").inner_text()
    _shot(page, "editor-problem")
    assert _serious(page) == []

    # A form posts the YAML as typed: fix the tier by hand, then add a rate limit with the form.
    page.fill("#policy-source", V1)
    page.locator("#form-rate_limits summary").click()
    page.fill("#id_rate_limits-id", "emails")
    page.fill("#id_rate_limits-action", "tool:send_email")
    page.fill("#id_rate_limits-limit", "30")
    page.locator("#form-rate_limits button[type=submit]").click()
    page.wait_for_selector("#editor-notice")
    text = page.locator("#policy-source").input_value()
    assert "id: emails" in text and "id: refund-tier-1" in text
    page.locator("#form-rules summary").click()
    _shot(page, "editor-forms")

    for path, name in (
        (f"/policies/versions/{draft.pk}/", "version"),
        (f"/policies/versions/{draft.pk}/simulate/", "simulate"),
        ("/policies/default/diff/", "diff"),
        ("/policies/default/", "versions"),
    ):
        page.goto(f"{live_server.url}{path}")
        assert _serious(page) == [], path
        _shot(page, name)
    assert page.refused == []
