"""Websockets check their user again before every push, and only this site's pages open them."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
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
EVENT = {"type": "run.event", "event": {"kind": "step", "change": "running", "status": "running"}}


@pytest.fixture(autouse=True)
def _web_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


@pytest.fixture
def run_id(db: None) -> int:
    return run_submit(
        workflow="research_brief", input={"question": "What does it cost?"}, submitted_by=None
    ).run.pk


@pytest.fixture
def watcher(db: None) -> Any:
    return UserFactory(username="watcher", permissions=["orchestration.view_run"])


def login(user: Any) -> tuple[Client, tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    name = django_settings.SESSION_COOKIE_NAME
    return client, (b"cookie", f"{name}={client.cookies[name].value}".encode())


async def open_socket(path: str, *headers: tuple[bytes, bytes]) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    return communicator


async def closed_with(communicator: WebsocketCommunicator) -> int | None:
    message = await communicator.receive_output(timeout=5)
    await communicator.wait()
    return message.get("code") if message["type"] == "websocket.close" else None


async def test_logout_closes_the_stream_on_the_next_event(run_id: int, watcher: Any) -> None:
    client, cookie = await database_sync_to_async(login)(watcher)
    communicator = await open_socket(f"/ws/runs/{run_id}/", ORIGIN, cookie)
    await database_sync_to_async(client.post)("/accounts/logout/")
    await get_channel_layer().group_send(run_group(run_id), EVENT)
    assert await closed_with(communicator) == 4401


async def test_logout_closes_every_stream_of_the_session_at_once(run_id: int, watcher: Any) -> None:
    client, cookie = await database_sync_to_async(login)(watcher)
    run_page = await open_socket(f"/ws/runs/{run_id}/", ORIGIN, cookie)
    run_list = await open_socket("/ws/runs/", ORIGIN, cookie)
    await database_sync_to_async(client.post)("/accounts/logout/")  # no event follows
    assert await closed_with(run_page) == 4401
    assert await closed_with(run_list) == 4401


async def test_deactivation_closes_the_stream(run_id: int, watcher: Any) -> None:
    _, cookie = await database_sync_to_async(login)(watcher)
    communicator = await open_socket("/ws/runs/", ORIGIN, cookie)
    watcher.is_active = False
    await database_sync_to_async(watcher.save)()
    await get_channel_layer().group_send(RUNS_GROUP, EVENT)
    assert await closed_with(communicator) == 4401


async def test_a_lost_permission_closes_the_run_stream(run_id: int, watcher: Any) -> None:
    _, cookie = await database_sync_to_async(login)(watcher)
    communicator = await open_socket(f"/ws/runs/{run_id}/", ORIGIN, cookie)
    await get_channel_layer().group_send(run_group(run_id), EVENT)
    assert f"Run #{run_id}" in await communicator.receive_from(timeout=5)
    await database_sync_to_async(watcher.user_permissions.clear)()
    await get_channel_layer().group_send(run_group(run_id), EVENT)
    assert await closed_with(communicator) == 4403


async def test_a_lost_permission_narrows_the_run_list(run_id: int, watcher: Any) -> None:
    _, cookie = await database_sync_to_async(login)(watcher)
    communicator = await open_socket("/ws/runs/", ORIGIN, cookie)
    try:
        await get_channel_layer().group_send(RUNS_GROUP, EVENT)
        assert f">#{run_id}<" in await communicator.receive_from(timeout=5)
        await database_sync_to_async(watcher.user_permissions.clear)()
        await get_channel_layer().group_send(RUNS_GROUP, EVENT)
        assert f">#{run_id}<" not in await communicator.receive_from(timeout=5)
    finally:
        await communicator.disconnect()


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (b"http://testserver", True),
        (b"http://testserver:80", True),
        (b"http://testserver:8001", False),  # another port
        (b"https://testserver", False),  # another scheme
        (b"http://evil.example", False),
        (b"null", False),
    ],
)
async def test_only_this_sites_pages_may_open_a_socket(
    watcher: Any, origin: bytes, accepted: bool
) -> None:
    _, cookie = await database_sync_to_async(login)(watcher)
    communicator = WebsocketCommunicator(
        application, "/ws/runs/", headers=[(b"origin", origin), cookie]
    )
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    assert connected is accepted


async def test_a_secure_socket_accepts_its_https_page(watcher: Any) -> None:
    _, cookie = await database_sync_to_async(login)(watcher)
    headers = [(b"origin", b"https://testserver"), (b"host", b"testserver"), cookie]
    communicator = WebsocketCommunicator(application, "/ws/runs/", headers=headers)
    communicator.scope["scheme"] = "wss"
    connected, _ = await communicator.connect(timeout=5)
    await communicator.disconnect()
    assert connected
