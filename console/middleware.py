"""Middleware of Signalbox's own."""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync, sync_to_async
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils import timezone
from servestatic.middleware import ServeStaticMiddleware

from console.models import UserProfile


class StaticFilesMiddleware:
    """servestatic's middleware in a synchronous chain (see ``console.handlers``).

    servestatic's middleware is asynchronous only, so in a synchronous chain Django would hop to
    the event loop and back for every request to let it look at the path. This one looks at the
    path itself: a request under the static prefix goes to servestatic (which serves the file,
    or in debug explains a missing one), any other goes on down the chain without a hop
    (0.55 ms less web CPU per request than servestatic's middleware adapted into the chain;
    pinned by tests/console/test_asgi_matches_django.py).
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response
        self.static = ServeStaticMiddleware(sync_to_async(get_response, thread_sensitive=True))
        self.prefix = self.static.static_prefix

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path_info.startswith(self.prefix):
            return async_to_sync(self.static)(request)
        return self.get_response(request)


#: Browser features no page of the console uses, switched off for every response.
PERMISSIONS_POLICY = ", ".join(
    f"{feature}=()"
    for feature in (
        "accelerometer",
        "camera",
        "geolocation",
        "gyroscope",
        "magnetometer",
        "microphone",
        "payment",
        "usb",
        "interest-cohort",
    )
)


class PermissionsPolicyMiddleware:
    """Sends ``Permissions-Policy`` turning off camera, microphone, geolocation, payment, …"""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        return response


#: The session key holding the user's zone name, set at login and when they change it (so pages
#: cost no query for it).
SESSION_TIME_ZONE = "sbx_time_zone"


class UserTimeZoneMiddleware:
    """Shows times in the logged-in user's own zone (their account settings), UTC otherwise."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        zone = None
        session = getattr(request, "session", None)
        name = session.get(SESSION_TIME_ZONE) if session is not None else None
        if name and name != "UTC":
            try:
                zone = zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                zone = None
        if zone is not None:
            timezone.activate(zone)
            request.user_time_zone = name  # type: ignore[attr-defined]  # a per-request attribute HttpRequest does not declare
        try:
            return self.get_response(request)
        finally:
            if zone is not None:
                timezone.deactivate()


def remember_time_zone(request: HttpRequest, user: Any) -> None:
    """Keep the user's zone in their session (at login, and when they change it)."""
    name = UserProfile.objects.filter(user=user).values_list("time_zone", flat=True).first()
    if getattr(request, "session", None) is not None:
        request.session[SESSION_TIME_ZONE] = name or "UTC"
