"""Claims pushed live: when one operator claims or releases an item, another operator's inbox
and item page show it (who holds it, until when) within a second, through the real path: the
service's event after commit, the Redis channel layer, the consumer's re-render."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connections
from django.test import Client

from console.asgi import application
from orchestration.models import Run, Wait
from orchestration.services import approval_decide, run_submit, wait_claim, wait_release
from tests.conftest import OPERATOR_PERMISSIONS
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://testserver")


@pytest.fixture(autouse=True)
def _web_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis channel layer (as in production) with live events on; database connections
    per call as the web process has them; no broker for the steps the engine wakes."""
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "infra.channels.RedisChannelLayer",
            "CONFIG": {
                "hosts": [django_settings.REDIS_URL],
                "prefix": f"claims-test-{secrets.token_hex(4)}",
            },
        }
    }
    settings.SIGNALBOX = {**settings.SIGNALBOX, "LIVE_EVENTS": True}
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


@pytest.fixture
def item(requester: Any, drive: Callable[[int], Run]) -> Wait:
    run = drive(
        run_submit(
            workflow="content_pipeline", input={"topic": "Queues"}, submitted_by=requester
        ).run.pk
    )
    return Wait.objects.get(run=run, kind="approval", status="open")


@pytest.fixture
def watcher(db: None) -> Any:
    return UserFactory(username="watcher", permissions=OPERATOR_PERMISSIONS)


@pytest.fixture
def claimer(db: None) -> Any:
    return UserFactory(username="claimer", permissions=OPERATOR_PERMISSIONS)


def session_cookie(user: Any) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return (b"cookie", f"{name}={client.cookies[name].value}".encode())


async def open_socket(path: str, user: Any) -> WebsocketCommunicator:
    cookie = await database_sync_to_async(session_cookie)(user)
    communicator = WebsocketCommunicator(application, path, headers=[ORIGIN, cookie])
    connected, _ = await communicator.connect(timeout=5)
    assert connected, path
    await communicator.receive_from(timeout=5)  # the render on connect
    return communicator


async def first_render_matching(
    communicator: WebsocketCommunicator, predicate: Callable[[str], bool]
) -> tuple[str, float]:
    """The first render for which ``predicate`` holds, and the seconds it took to come."""
    started = time.monotonic()
    while True:
        html = await communicator.receive_from(timeout=5)
        if predicate(html):
            return html, time.monotonic() - started


def event_id(html: str) -> int:
    match = re.search(r'data-event-id="(\d+)"', html)
    assert match is not None
    return int(match.group(1))


async def test_a_claim_and_its_release_reach_another_operators_inbox_within_a_second(
    item: Wait, watcher: Any, claimer: Any
) -> None:
    inbox = await open_socket("/ws/inbox/", watcher)
    try:
        started = time.monotonic()
        claim = await database_sync_to_async(wait_claim)(wait_id=item.pk, user=claimer)
        html, _ = await first_render_matching(inbox, lambda h: "claimed by claimer" in h)
        claimed_after = time.monotonic() - started
        row = html[html.index(f'id="item-{item.pk}"') :]
        assert f'data-claim-until="{claim.expires_at.isoformat()}"' in row
        assert claimed_after < 1.0, f"the claim showed after {claimed_after:.2f} s"
        claimed_mark = event_id(html)

        started = time.monotonic()
        await database_sync_to_async(wait_release)(wait_id=item.pk, user=claimer)
        html, _ = await first_render_matching(inbox, lambda h: "claimed by" not in h)
        released_after = time.monotonic() - started
        assert f'id="item-{item.pk}"' in html  # still open, now unclaimed
        assert released_after < 1.0, f"the release showed after {released_after:.2f} s"
        # Each change moves the page's catch-up mark (its audit row), so a gap is noticed.
        assert event_id(html) > claimed_mark
    finally:
        await inbox.disconnect()


async def test_the_item_page_shows_who_holds_it_live(
    item: Wait, watcher: Any, claimer: Any
) -> None:
    page = await open_socket(f"/ws/inbox/{item.pk}/", watcher)
    try:
        claim = await database_sync_to_async(wait_claim)(wait_id=item.pk, user=claimer)
        html, seconds = await first_render_matching(page, lambda h: "Claimed by claimer" in h)
        assert html.startswith('<div id="item-live"') and 'hx-swap-oob="true"' in html
        assert f'data-claim-until="{claim.expires_at.isoformat()}"' in html
        assert seconds < 1.0

        await database_sync_to_async(wait_release)(wait_id=item.pk, user=claimer)
        html, _ = await first_render_matching(page, lambda h: "Claimed by" not in h)
        assert 'id="already-decided"' not in html

        # Decided by the other operator: the page says so without a reload.
        await database_sync_to_async(approval_decide)(
            wait_id=item.pk, user=claimer, decision="approve", reason="fine"
        )
        html, _ = await first_render_matching(page, lambda h: 'id="already-decided"' in h)
        assert "(approve) by claimer" in html
    finally:
        await page.disconnect()


async def test_the_item_socket_refuses_users_who_may_not_see_the_run(
    item: Wait, stranger: Any
) -> None:
    cookie = await database_sync_to_async(session_cookie)(stranger)
    communicator = WebsocketCommunicator(
        application, f"/ws/inbox/{item.pk}/", headers=[ORIGIN, cookie]
    )
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    assert not connected
