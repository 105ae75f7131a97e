"""Live pages in real Chromium against a real uvicorn: when the server restarts, an open inbox
says it is offline, reconnects by itself and shows what changed meanwhile without a reload;
logging out in one tab closes the live stream of another tab at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestration.models import Wait
from orchestration.services import run_submit
from tests.conftest import OPERATOR_PERMISSIONS
from tests.e2e.conftest import E2E, WebServer, signed_in
from tests.factories import UserFactory

pytestmark = E2E


def escalation(drive: Callable[[int], Any]) -> Wait:
    """A run that failed past its retries, escalated to an operator (committed on return)."""
    run = run_submit(
        workflow="escalating", input={"fail_attempts": 2, "text": "hi"}, submitted_by=None
    ).run
    drive(run.pk)
    return Wait.objects.get(run=run, kind="escalation", status="open")


def sockets(page: Any) -> list[Any]:
    """The page's websockets, as it opens them (``.closed`` once closed)."""
    opened: list[Any] = []

    def track(ws: Any) -> None:
        ws.closed = False
        ws.on("close", lambda _: setattr(ws, "closed", True))
        opened.append(ws)

    page.on("websocket", track)
    return opened


def test_after_a_server_restart_the_inbox_reconnects_and_shows_what_it_missed(
    web: WebServer,
    server: str,
    context: Any,
    engine_in_process: None,
    drive: Callable[[int], Any],
) -> None:
    operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
    page = signed_in(context, server, operator)
    page.goto(f"{server}/inbox/")
    state = page.locator("[data-live-state]").first
    page.wait_for_selector("[data-live-state].is-live")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads

    web.stop()
    page.wait_for_selector("[data-live-state].is-offline", timeout=10_000)
    assert "offline" in state.inner_text()
    missed = escalation(drive)  # committed while nobody serves the page

    web.start()
    page.wait_for_selector("[data-live-state].is-live", timeout=30_000)
    page.wait_for_selector(f"#item-{missed.pk}", timeout=10_000)
    assert page.evaluate("window.loadedOnce") is True
    assert page.refused == []


def test_logging_out_in_one_tab_closes_the_stream_of_another(
    server: str, context: Any, engine_in_process: None, drive: Callable[[int], Any]
) -> None:
    operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
    inbox = signed_in(context, server, operator)
    opened = sockets(inbox)
    inbox.goto(f"{server}/inbox/")
    inbox.wait_for_selector("[data-live-state].is-live")
    first = escalation(drive)
    inbox.wait_for_selector(f"#item-{first.pk}", timeout=10_000)  # pushes arrive

    other = context.new_page()  # the same browser profile: the same session
    other.goto(f"{server}/account/")
    other.get_by_role("button", name="Log out").click()
    other.wait_for_url(f"{server}/accounts/login/")

    inbox.wait_for_selector("[data-live-state].is-offline", timeout=3_000)  # at once, no push
    assert "signed out" in inbox.locator("[data-live-state]").first.inner_text()
    assert len(opened) == 1 and opened[0].closed  # closed, and not reopened
    second = escalation(drive)
    inbox.wait_for_timeout(1_500)  # longer than a push takes
    assert inbox.locator(f"#item-{second.pk}").count() == 0
    assert len(opened) == 1
