"""HTTP through the ASGI application as the web process serves it: the request's signals, the
middleware chain and the view run together on a thread of the process's pool, and still do
everything they did."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import SyncToAsync
from channels.db import database_sync_to_async
from django.contrib.auth.models import Permission
from django.core.signals import request_finished, request_started
from django.db import connections

from console.handlers import OneHopASGIHandler
from console.models import ApiToken
from orchestration.models import Run
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]
SIGNALS = {"started": request_started, "finished": request_finished}


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


async def test_a_submit_crosses_to_a_thread_of_the_pool_once(
    submitter_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crossings: list[str] = []
    original = SyncToAsync.__call__

    async def counted(self: SyncToAsync, *args: Any, **kwargs: Any) -> Any:
        crossings.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    threads: dict[str, str] = {}

    def seen(name: str) -> Any:
        def receiver(**kwargs: Any) -> None:
            threads[name] = threading.current_thread().name

        return receiver

    handler = OneHopASGIHandler()
    submitted = handler.executor.submit
    hops: list[str] = []

    def submit(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn.__name__)
        return submitted(fn, *args, **kwargs)

    receivers = {signal: seen(name) for name, signal in SIGNALS.items()}
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(SyncToAsync, "__call__", counted)
            patch.setattr(handler.executor, "submit", submit)
            async with client_for(handler, authorization=f"Bearer {submitter_token}") as client:
                response = await client.post(
                    "/api/v1/runs", json={"workflow": "reference_workload", "input": {}}
                )
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)
    assert response.status_code == 201, response.text
    # The request_started signal, the middleware chain, the view and closing the response in one
    # call on a thread of the pool; Django's own handler starts a thread for the request and
    # crosses to it once per signal and middleware hook (seventeen in all here).
    assert hops == ["_respond"], hops
    assert crossings == [], crossings
    assert set(threads) == {"started", "finished"}
    assert threads["started"] == threads["finished"]
    assert threads["started"].startswith("request")
    assert await database_sync_to_async(Run.objects.filter(pk=response.json()["id"]).exists)()


async def test_requests_reuse_the_threads_of_the_pool(submitter_token: str) -> None:
    names: list[str] = []

    def receiver(**kwargs: Any) -> None:
        names.append(threading.current_thread().name)

    request_started.connect(receiver, weak=False)
    try:
        async with client_for(OneHopASGIHandler()) as client:
            for _ in range(20):
                assert (await client.get("/api/v1/health")).status_code == 200
    finally:
        request_started.disconnect(receiver)
    # One request at a time: a thread or two of the pool serve them all (the pool starts a
    # second when a request comes before the first thread is back waiting); Django's handler
    # would have started twenty threads.
    assert len(names) == 20 and len(set(names)) <= 3, names
    assert all(name.startswith("request") for name in names), names


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
