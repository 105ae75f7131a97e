"""HTTP through the ASGI application as the web process serves it: the middleware chain and the
view run together in the request's thread, and still do everything they did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import SyncToAsync
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.db import connections

from console.handlers import OneHopASGIHandler
from console.models import ApiToken
from orchestration.models import Run
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _web_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # A connection per request, as the web process has them (one kept in a request's thread
    # would outlive the test).
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)


def client_for(app: Any, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers
    )


@pytest.fixture
def submitter_token() -> str:
    user = UserFactory()
    user.user_permissions.add(
        Permission.objects.get(codename="add_run"), Permission.objects.get(codename="submit_runs")
    )
    return ApiToken.issue(user, "cli")[1]


async def test_a_submit_crosses_to_its_thread_three_times(
    submitter_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crossings: list[str] = []
    original = SyncToAsync.__call__

    async def counted(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        crossings.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    handler = OneHopASGIHandler()
    with monkeypatch.context() as patch:
        patch.setattr(SyncToAsync, "__call__", counted)
        async with client_for(handler, authorization=f"Bearer {submitter_token}") as client:
            response = await client.post(
                "/api/v1/runs", json={"workflow": "reference_workload", "input": {}}
            )
    assert response.status_code == 201, response.text
    # The request_started signal, the middleware chain with the view, closing the response:
    # Django's own handler crosses once per middleware hook as well (seventeen in all here).
    assert len(crossings) == 3, crossings
    assert await database_sync_to_async(Run.objects.filter(pk=response.json()["id"]).exists)()


async def test_the_chain_still_refuses_what_it_refused(submitter_token: str) -> None:
    async with client_for(OneHopASGIHandler()) as client:
        unauthenticated = await client.get("/api/v1/runs")
        # A session post without its CSRF token is refused before the view.
        cross_site = await client.post("/accounts/login/", data={"username": "x", "password": "y"})
        page = await client.get("/api/v1/health")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["code"] == "unauthenticated"
    assert cross_site.status_code == 403
    # The security middleware's headers are on every response.
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"


async def test_static_files_are_served_through_the_chain(settings: Any) -> None:
    settings.SERVESTATIC_USE_FINDERS = True  # the tests collect no static files
    async with client_for(OneHopASGIHandler()) as client:
        css = await client.get("/static/console/console.css")
        missing = await client.get("/static/console/missing.css")
        api = await client.get("/api/v1/health")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert css.content == (ROOT / "static/console/console.css").read_bytes()
    assert missing.status_code == 404
    assert api.json() == {"status": "ok"}
