"""The inbox in real Chromium, against a live ASGI server and real worker processes: a new
escalation appears without a reload, an operator answers it from the keyboard and the run
completes on screen; an edit with a contract error is shown in place, then fixed; a tier-1
operator cannot act on a tier-3 item. Screenshots go to docs/screenshots/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from orchestration.models import Run, Wait
from orchestration.services import run_submit
from tests.conftest import OPERATOR_PERMISSIONS, wait_for_run, wait_until
from tests.factories import UserFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
PASSWORD = "correct horse battery staple"
TIER_1 = [
    p
    for p in OPERATOR_PERMISSIONS
    if p not in ("orchestration.decide_tier_2", "orchestration.decide_tier_3")
]


@pytest.fixture(autouse=True)
def _sync_orm_beside_playwright(monkeypatch: pytest.MonkeyPatch) -> None:
    """Playwright's sync API keeps an event loop on this thread; the test's own ORM calls are
    still plain synchronous ones."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(_broker_clean: None) -> Iterator[str]:
    """uvicorn serving the console against the test database, as production serves it."""
    port = _free_port()
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "PYTHONPATH": str(ROOT),
        # Static files from the finders (the tests collect none), as the development server does.
        "DEBUG": "true",
    }
    log = Path(tempfile.mkstemp(prefix="web-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "console.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:]) from None
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(15)


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    )
    if not executable:
        pytest.skip("no chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def live_workers(start_worker: Callable[..., Any]) -> Any:
    return start_worker("e2e", SIGNALBOX_LIVE_EVENTS="true")


def login(browser: Any, server: str, username: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server}/accounts/login/")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', PASSWORD)
    page.click('button[type="submit"]')
    page.wait_for_url(f"{server}/")
    return page


def test_a_new_escalation_appears_live_and_is_answered_by_keyboard(
    server: str, browser: Any, live_workers: Any
) -> None:
    UserFactory(username="op", permissions=OPERATOR_PERMISSIONS)
    page = login(browser, server, "op")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "home.png"), full_page=True)
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
    page.screenshot(path=str(SHOTS / "inbox.png"), full_page=True)

    page.keyboard.press("j")
    page.keyboard.press("o")
    page.wait_for_url(f"{server}/inbox/{wait.pk}/")
    page.screenshot(path=str(SHOTS / "inbox-item.png"), full_page=True)
    page.keyboard.press("a")  # retry
    page.wait_for_url(f"{server}/inbox/")
    assert wait_for_run(run.pk).status == "succeeded"
    page.goto(f"{server}/runs/{run.pk}/")
    page.wait_for_selector(".status-succeeded")


def test_edit_with_a_contract_error_is_shown_in_place_then_fixed(
    server: str, browser: Any, live_workers: Any
) -> None:
    UserFactory(username="op", permissions=OPERATOR_PERMISSIONS)
    requester = UserFactory(
        username="asker", permissions=["orchestration.add_run", "policies.submit_runs"]
    )
    run = run_submit(
        workflow="content_pipeline", input={"topic": "Queues"}, submitted_by=requester
    ).run
    wait = wait_until(
        lambda: Wait.objects.filter(run=run, kind="approval", status="open").first(),
        timeout=60,
        what="the approval",
    )
    page = login(browser, server, "op")
    page.goto(f"{server}/inbox/{wait.pk}/")
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
    assert Wait.objects.get(pk=wait.pk).edited_input["topic"] == "Queues, revisited"
    assert wait_for_run(run.pk, timeout=60).status == "succeeded"


def test_a_tier_1_operator_cannot_act_on_a_tier_3_item(
    server: str, browser: Any, live_workers: Any
) -> None:
    UserFactory(username="junior", permissions=TIER_1)
    requester = UserFactory(
        username="asker", permissions=["orchestration.add_run", "policies.submit_runs"]
    )
    run = run_submit(
        workflow="content_pipeline", input={"topic": "Queues"}, submitted_by=requester
    ).run
    wait = wait_until(
        lambda: Wait.objects.filter(run=run, kind="approval", status="open").first(),
        timeout=60,
        what="the approval",
    )
    Wait.objects.filter(pk=wait.pk).update(tier=3)
    page = login(browser, server, "junior")
    page.goto(f"{server}/inbox/")
    assert "needs tier 3" in page.inner_text(f"#item-{wait.pk}")
    page.goto(f"{server}/inbox/{wait.pk}/")
    assert page.locator('button[value="approve"]').count() == 0
    page.keyboard.press("a")  # nothing to press
    assert Run.objects.get(pk=run.pk).status == "waiting"
