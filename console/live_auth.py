"""Who may keep a websocket open, checked again before every push, and which pages may open one.

A websocket outlives the request that opened it: the user may log out (which deletes the
session), be deactivated, change their password or lose a permission while it is open. Before
each render the consumer asks :func:`live_user_now` for the user afresh; it closes the socket with
:data:`CLOSE_UNAUTHENTICATED` (4401) or :data:`CLOSE_FORBIDDEN` (4403), or renders with the
fresh user so a list narrows at once.
"""

from __future__ import annotations

import hashlib
import logging
from importlib import import_module
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db import transaction
from django.dispatch import receiver
from django.http import HttpRequest
from django.http.request import split_domain_port, validate_host
from django.utils.crypto import constant_time_compare

log = logging.getLogger(__name__)

#: Close codes (the 4000s are the application's): log in again / no longer allowed.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403

DEFAULT_PORTS = {"http": "80", "https": "443"}


def live_user_now(session_key: str | None) -> tuple[Any, int | None]:
    """The user of the session ``session_key`` read afresh (session, then user), or None and the
    close code. Called in the database thread, with the render it guards."""
    if not session_key:
        return None, CLOSE_UNAUTHENTICATED
    store = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    data = store.load()  # fresh from the store: a logout has deleted it
    user_id = data.get(SESSION_KEY)
    if user_id is None or data.get(BACKEND_SESSION_KEY) not in settings.AUTHENTICATION_BACKENDS:
        return None, CLOSE_UNAUTHENTICATED
    model = get_user_model()
    user = model._default_manager.filter(pk=model._meta.pk.to_python(user_id)).first()
    if user is None or not user.is_active:
        return None, CLOSE_UNAUTHENTICATED
    # A password change (or "log out everywhere") changes the hash the session was bound to.
    if not constant_time_compare(data.get(HASH_SESSION_KEY, ""), user.get_session_auth_hash()):
        return None, CLOSE_UNAUTHENTICATED
    return user, None


def session_group(session_key: str) -> str:
    """The channel-layer group of the sockets opened with one session (a digest: group names
    are visible in Redis, session keys must not be)."""
    return "session-" + hashlib.sha256(session_key.encode()).hexdigest()[:40]


@receiver(user_logged_out, dispatch_uid="console.live_auth.logged_out")
def _logged_out(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """A logout closes the session's sockets in every tab at once, not at their next push."""
    key = getattr(getattr(request, "session", None), "session_key", None)
    if key:
        transaction.on_commit(lambda: _session_sockets_close(key))


def _session_sockets_close(session_key: str) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(session_group(session_key), {"type": "session.ended"})
    except Exception:  # the sockets still close at their next push (live_user_now)
        log.warning("logout not sent to the session's sockets", exc_info=True)


# --- origins -----------------------------------------------------------------------------------


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin1")
    return None


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Whether the page that opens the socket is this site: its scheme, host and port are the
    socket's own (host in ALLOWED_HOSTS), or it is listed in CSRF_TRUSTED_ORIGINS exactly."""
    origin = _header(scope, b"origin")
    if not origin:
        return False
    try:
        parts = urlsplit(origin)
        port = str(parts.port or DEFAULT_PORTS.get(parts.scheme, ""))
    except ValueError:
        return False
    if not parts.hostname or parts.scheme not in DEFAULT_PORTS:
        return False
    normalized = f"{parts.scheme}://{parts.hostname}:{port}"
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        t = urlsplit(trusted)
        if (
            "*" not in trusted
            and normalized
            == f"{t.scheme}://{t.hostname}:{t.port or DEFAULT_PORTS.get(t.scheme, '')}"
        ):
            return True
    # What the socket itself was opened on (the proxy's forwarded scheme if it sends one).
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        header = proxy[0].removeprefix("HTTP_").lower().replace("_", "-").encode()
        forwarded = _header(scope, header)
        if forwarded is not None:
            scheme = "https" if forwarded == proxy[1] else "http"
    host = _header(scope, b"host")
    if host:
        own_host, own_port = split_domain_port(host)
        own_port = own_port or DEFAULT_PORTS[scheme]
    else:
        server = scope.get("server") or (None, None)
        own_host, own_port = (parts.hostname, str(server[1] or DEFAULT_PORTS[scheme]))
    if not own_host or not validate_host(own_host, settings.ALLOWED_HOSTS):
        return False
    return (parts.scheme, parts.hostname, port) == (scheme, own_host, own_port)


class SameOriginValidator:
    """ASGI middleware: refuses a websocket whose Origin is not this site (scheme, host, port)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
