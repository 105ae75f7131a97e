"""How API clients prove who they are: a bearer token, or the console's session login."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import Permission
from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone
from ninja.security import HttpBearer, SessionAuth

from console.models import ApiToken, token_digest

# Recording every use would turn each API read into a write; a minute's precision is enough.
LAST_USED_PRECISION = timedelta(minutes=1)


class ApiTokenAuth(HttpBearer):
    """``Authorization: Bearer sbx_...``: an unrevoked token of an active user."""

    def authenticate(self, request: HttpRequest, token: str) -> Any:
        if not token or len(token) > 200:
            return None
        api_token = (
            ApiToken.objects.select_related("user")
            .filter(digest=token_digest(token), revoked_at__isnull=True)
            .first()
        )
        if api_token is None or not api_token.user.is_active:
            return None
        now = timezone.now()
        stale = now - LAST_USED_PRECISION
        if api_token.last_used_at is None or api_token.last_used_at < stale:
            ApiToken.objects.filter(pk=api_token.pk).filter(
                Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale)
            ).update(last_used_at=now)
        return api_token.user


class SingleQueryModelBackend(ModelBackend):
    """Django's ModelBackend, loading a user's model permissions (direct and through groups) in
    one query instead of two. Each request loads its user afresh, so this runs on every request
    that checks a permission; the result is kept on the user object for that request, as
    Django's own backend keeps it."""

    def get_all_permissions(self, user_obj: Any, obj: Any = None) -> set[str]:
        if not user_obj.is_active or user_obj.is_anonymous or obj is not None:
            return set()
        if not hasattr(user_obj, "_perm_cache"):
            if user_obj.is_superuser:
                user_obj._perm_cache = super().get_all_permissions(user_obj)
            else:
                rows = (
                    Permission.objects.filter(Q(user=user_obj) | Q(group__user=user_obj))
                    .values_list("content_type__app_label", "codename")
                    .distinct()
                )
                user_obj._perm_cache = {f"{app_label}.{codename}" for app_label, codename in rows}
        return user_obj._perm_cache  # type: ignore[no-any-return]


class ConsoleSessionAuth(SessionAuth):
    """The console's session login; unsafe methods must carry the CSRF token.

    Unlike ninja's ``django_auth``, a request without a logged-in session is simply not
    authenticated by this class (401), rather than failing the CSRF check first (403): a client
    that forgot its token should be told so.
    """

    def _get_key(self, request: HttpRequest) -> str | None:
        if not request.user.is_authenticated:
            return None
        return super()._get_key(request)


api_token_auth = ApiTokenAuth()
session_auth = ConsoleSessionAuth(csrf=True)
