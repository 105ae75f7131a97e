"""Websockets behind the live pages: who may connect, and what an event makes them send."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connections
from django.test import Client

from console.asgi import application
from orchestration.live import RUNS_GROUP, run_group
from orchestration.services import run_submit
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ORIGIN = (b"origin", b"http://testserver")
RUN_EVENT = {
    "type": "run.event",
    "event": {"kind": "step", "change": "running", "status": "running"},
}


@pytest.fixture(autouse=True)
def _web_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory channel layer, and database connections per call as the web process has
    them (a connection kept open in the consumers' worker thread would outlive the test).

    Submitting commits here, which would publish the first steps: nothing consumes them, and
    Celery would keep a broker connection to the test's broker for the tests that follow."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


@pytest.fixture
def run_id(viewer: Any) -> int:
    return run_submit(
        workflow="research_brief", input={"question": "What does it cost?"}, submitted_by=None
    ).run.pk


def session_cookie(user: Any) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return (b"cookie", f"{name}={client.cookies[name].value}".encode())


@pytest.fixture
def viewer_cookie(viewer: Any) -> tuple[bytes, bytes]:
    return session_cookie(viewer)


@pytest.fixture
def submitter_cookie(submitter: Any) -> tuple[bytes, bytes]:
    """A user who sees only the runs they submitted (none here)."""
    return session_cookie(submitter)


@pytest.fixture
def deactivated_cookie(db: None) -> tuple[bytes, bytes]:
    """The session of a user who was deactivated after logging in."""
    user = UserFactory(username="gone", permissions=["orchestration.view_run"])
    cookie = session_cookie(user)
    user.is_active = False
    user.save()
    return cookie


async def connect(path: str, *headers: tuple[bytes, bytes]) -> tuple[WebsocketCommunicator, bool]:
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    connected, _ = await communicator.connect(timeout=5)
    if not connected:
        # Let the refused consumer finish, so nothing holds a database connection afterwards.
        await communicator.disconnect()
    return communicator, connected


async def accepted(path: str, *headers: tuple[bytes, bytes]) -> bool:
    communicator, connected = await connect(path, *headers)
    if connected:
        await communicator.disconnect()
    return connected


async def test_anonymous_user_is_rejected(run_id: int) -> None:
    assert not await accepted(f"/ws/runs/{run_id}/", ORIGIN)
    assert not await accepted("/ws/runs/", ORIGIN)


async def test_wrong_origin_is_rejected(run_id: int, viewer_cookie: tuple[bytes, bytes]) -> None:
    assert not await accepted(
        f"/ws/runs/{run_id}/", (b"origin", b"http://evil.example"), viewer_cookie
    )


async def test_user_who_may_not_see_the_run_is_rejected(
    run_id: int, submitter_cookie: tuple[bytes, bytes]
) -> None:
    assert not await accepted(f"/ws/runs/{run_id}/", ORIGIN, submitter_cookie)


async def test_missing_run_is_rejected(viewer_cookie: tuple[bytes, bytes]) -> None:
    assert not await accepted("/ws/runs/999999/", ORIGIN, viewer_cookie)


async def test_authorized_user_receives_the_run_sections_after_an_event(
    run_id: int, viewer_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect(f"/ws/runs/{run_id}/", ORIGIN, viewer_cookie)
    assert connected
    try:
        await get_channel_layer().group_send(
            run_group(run_id), {**RUN_EVENT, "event": {**RUN_EVENT["event"], "run_id": run_id}}
        )
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()

    # Every top-level element has an id, so the htmx ws extension can swap it.
    assert html.lstrip().startswith('<section id="run-summary" ')
    for section in ("run-summary", "run-steps", "run-waits", "run-state", "run-audit"):
        assert f'<section id="{section}" class="card"' in html
    assert 'hx-swap-oob="true"' in html
    assert f"Run #{run_id}" in html
    # A step-level event leaves the open/closed inputs and outputs alone.
    assert 'id="run-io"' not in html


async def test_a_run_status_change_also_sends_inputs_and_outputs(
    run_id: int, viewer_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect(f"/ws/runs/{run_id}/", ORIGIN, viewer_cookie)
    assert connected
    try:
        event = {"run_id": run_id, "kind": "run", "change": "succeeded", "status": "succeeded"}
        await get_channel_layer().group_send(
            run_group(run_id), {"type": "run.event", "event": event}
        )
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    assert '<section id="run-io" class="card"' in html


async def test_a_burst_of_events_is_sent_as_at_most_two_renders(
    run_id: int, viewer_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect(f"/ws/runs/{run_id}/", ORIGIN, viewer_cookie)
    assert connected
    try:
        layer = get_channel_layer()
        for _ in range(5):
            await layer.group_send(
                run_group(run_id), {**RUN_EVENT, "event": {**RUN_EVENT["event"], "run_id": run_id}}
            )
        # The first event renders at once; the others, arriving meanwhile, share one more.
        await communicator.receive_from(timeout=5)
        with contextlib.suppress(asyncio.TimeoutError):
            await communicator.receive_from(timeout=1)
        assert await communicator.receive_nothing(timeout=0.6)
    finally:
        await communicator.disconnect()


async def test_run_list_socket_sends_the_table(
    run_id: int, viewer_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect("/ws/runs/?status=queued", ORIGIN, viewer_cookie)
    assert connected
    try:
        await get_channel_layer().group_send(
            RUNS_GROUP, {**RUN_EVENT, "event": {**RUN_EVENT["event"], "run_id": run_id}}
        )
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    assert html.startswith('<div id="run-table" hx-swap-oob="true">')
    assert f">#{run_id}<" in html


async def test_run_list_socket_renders_only_what_the_user_may_see(
    run_id: int, submitter_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect("/ws/runs/", ORIGIN, submitter_cookie)
    assert connected
    try:
        await get_channel_layer().group_send(
            RUNS_GROUP, {**RUN_EVENT, "event": {**RUN_EVENT["event"], "run_id": run_id}}
        )
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    assert f">#{run_id}<" not in html
    assert "No runs yet." in html


async def test_deactivated_user_is_rejected(
    run_id: int, deactivated_cookie: tuple[bytes, bytes]
) -> None:
    assert not await accepted(f"/ws/runs/{run_id}/", ORIGIN, deactivated_cookie)


# --- home and inbox -------------------------------------------------------------------------------


async def test_home_socket_renders_on_connect_and_after_events(
    run_id: int, viewer_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect("/ws/home/", ORIGIN, viewer_cookie)
    assert connected
    try:
        first = await communicator.receive_from(timeout=5)  # the catch-up on connect
        await get_channel_layer().group_send(
            RUNS_GROUP, {**RUN_EVENT, "event": {**RUN_EVENT["event"], "run_id": run_id}}
        )
        second = await communicator.receive_from(timeout=5)
        await communicator.send_to(text_data='{"catchup": 0}')
        third = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    for html in (first, second, third):
        assert html.startswith('<div id="home-live" data-event-id="')
        assert f">#{run_id}<" in html


async def test_home_socket_counts_only_what_the_user_may_see(
    run_id: int, submitter_cookie: tuple[bytes, bytes]
) -> None:
    communicator, connected = await connect("/ws/home/", ORIGIN, submitter_cookie)
    assert connected
    try:
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    assert f">#{run_id}<" not in html
    assert '<span class="num" data-count="queued">0</span>' in html


async def test_inbox_socket_refuses_anonymous_and_renders_for_users(
    viewer_cookie: tuple[bytes, bytes],
) -> None:
    assert not await accepted("/ws/inbox/", ORIGIN)
    communicator, connected = await connect("/ws/inbox/", ORIGIN, viewer_cookie)
    assert connected
    try:
        html = await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()
    assert html.startswith('<div id="inbox-list"') and "Nothing waits for a decision." in html
