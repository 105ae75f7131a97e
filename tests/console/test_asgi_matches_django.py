"""OneHopASGIHandler (the middleware chain and the view in one hop to the request's thread) and
StaticFilesMiddleware, pinned against what they replace: Django's own ASGIHandler with
servestatic's own middleware. The same requests through both give the same statuses, headers,
cookies, bodies and request signals, so an upgrade of Django, asgiref or servestatic that
changes what the library does fails here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Permission
from django.core.handlers.asgi import ASGIHandler
from django.core.signals import got_request_exception, request_finished, request_started
from django.db import connections
from django.test import override_settings

from console.handlers import OneHopASGIHandler
from console.models import ApiToken
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _web_process(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    # A connection per request, as the web process has them.
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    settings.SERVESTATIC_USE_FINDERS = True  # the tests collect no static files


def django_handler(settings: Any) -> ASGIHandler:
    """Django's handler with the middleware as servestatic documents it (its own, async)."""
    middleware = [
        "servestatic.middleware.ServeStaticMiddleware"
        if name == "console.middleware.StaticFilesMiddleware"
        else name
        for name in settings.MIDDLEWARE
    ]
    assert middleware != settings.MIDDLEWARE
    with override_settings(MIDDLEWARE=middleware):
        return ASGIHandler()


@pytest.fixture
def signals_sent() -> Iterator[list[str]]:
    sent: list[str] = []
    receivers = {
        request_started: lambda **kw: sent.append("request_started"),
        request_finished: lambda **kw: sent.append("request_finished"),
        got_request_exception: lambda **kw: sent.append("got_request_exception"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    yield sent
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


VOLATILE = [
    (re.compile(rb"[A-Za-z0-9]{32,}"), b"<token>"),  # CSRF tokens, session keys, trace ids
    (re.compile(rb"\d{4}-\d\d-\d\dT[0-9:.]+(Z|[+-]\d\d:\d\d)?"), b"<time>"),
    (re.compile(rb"\d+"), b"<n>"),  # ids, sizes
]


def normalised(response: httpx.Response) -> dict[str, Any]:
    body = response.content
    for pattern, replacement in VOLATILE:
        body = pattern.sub(replacement, body)
    headers = []
    for name, value in response.headers.multi_items():
        if name == "content-length":
            continue  # follows the body, whose ids differ
        if name in ("expires", "date"):
            value = "<time>"  # the second the response was made
        if name == "set-cookie":
            cookie_name, _, attributes = value.partition("=")
            value = (
                cookie_name
                + "=<value>;"
                + re.sub(r"expires=[^;]+", "expires=<time>", attributes.partition(";")[2])
            )
        headers.append((name, value))
    return {"status": response.status_code, "headers": sorted(headers), "body": body}


async def exchange(
    client: httpx.AsyncClient, sent: list[str], step: dict[str, Any]
) -> dict[str, Any]:
    sent.clear()
    kwargs = dict(step["kwargs"])
    if step.get("with_csrf"):
        token = client.cookies["csrftoken"]
        kwargs["data"] = {**kwargs["data"], "csrfmiddlewaretoken": token}
    response = await client.request(step["method"], step["path"], **kwargs)
    return {**normalised(response), "signals": sorted(sent)}


async def test_the_one_hop_handler_answers_every_request_as_djangos_handler_does(
    settings: Any, signals_sent: list[str]
) -> None:
    user = await _user()
    token = await _token(user)
    bearer = {"authorization": f"Bearer {token}"}
    steps: list[dict[str, Any]] = [
        {"method": "GET", "path": "/api/v1/health", "kwargs": {}},
        {"method": "HEAD", "path": "/api/v1/health", "kwargs": {}},
        {"method": "GET", "path": "/api/v1/runs", "kwargs": {}},
        {"method": "GET", "path": "/api/v1/runs?limit=5", "kwargs": {"headers": bearer}},
        {
            "method": "POST",
            "path": "/api/v1/runs",
            "kwargs": {"headers": bearer, "content": b"{not json"},
        },
        {
            "method": "POST",
            "path": "/api/v1/runs",
            "kwargs": {"headers": bearer, "content": b"x" * 1_100_000},
        },
        {"method": "DELETE", "path": "/api/v1/health", "kwargs": {}},
        {"method": "GET", "path": "/api/v1/nowhere", "kwargs": {}},
        {
            "method": "POST",
            "path": "/api/v1/runs",
            "kwargs": {"headers": bearer, "json": {"workflow": "reference_workload", "input": {}}},
        },
        {"method": "GET", "path": "/static/console/console.css", "kwargs": {}},
        {"method": "GET", "path": "/static/console/missing.css", "kwargs": {}},
        {"method": "GET", "path": "/accounts/login", "kwargs": {}},  # CommonMiddleware's slash
        {"method": "GET", "path": "/nowhere/", "kwargs": {}},
        {"method": "GET", "path": "/", "kwargs": {}},  # to the login page
        {"method": "GET", "path": "/accounts/login/", "kwargs": {}},  # sets the CSRF cookie
        {
            "method": "POST",
            "path": "/accounts/login/",
            "kwargs": {"data": {"username": user.username, "password": PASSWORD}},
        },  # no CSRF token
        {
            "method": "POST",
            "path": "/accounts/login/",
            "with_csrf": True,
            "kwargs": {"data": {"username": user.username, "password": "wrong"}},
        },
        {
            "method": "POST",
            "path": "/accounts/login/",
            "with_csrf": True,
            "kwargs": {"data": {"username": user.username, "password": PASSWORD}},
        },  # session cookie
        {"method": "GET", "path": "/tools/", "kwargs": {}},
        {
            "method": "POST",
            "path": "/api/v1/runs",  # a session's unsafe call needs the CSRF token
            "kwargs": {"json": {"workflow": "reference_workload", "input": {}}},
        },
        {
            "method": "GET",
            "path": "/api/v1/runs?limit=1",
            "kwargs": {"headers": {"hx-request": "true"}},
        },
        {"method": "POST", "path": "/accounts/logout/", "with_csrf": True, "kwargs": {"data": {}}},
    ]
    ours_client = _client(OneHopASGIHandler())
    django_client = _client(django_handler(settings))
    async with ours_client, django_client:
        for step in steps:
            ours = await exchange(ours_client, signals_sent, step)
            django = await exchange(django_client, signals_sent, step)
            assert ours == django, (step["method"], step["path"])
            assert ours["signals"] == ["request_finished", "request_started"], step["path"]


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def _user() -> Any:
    from channels.db import database_sync_to_async

    def create() -> Any:
        user = UserFactory(password=PASSWORD)
        user.user_permissions.add(*Permission.objects.filter(codename__in=["add_run", "view_run"]))
        return user

    return await database_sync_to_async(create)()


async def _token(user: Any) -> str:
    from channels.db import database_sync_to_async

    return await database_sync_to_async(lambda: ApiToken.issue(user, "pinned")[1])()
