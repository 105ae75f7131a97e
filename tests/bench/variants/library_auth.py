"""The bearer-token check written with the ORM, as it would be without console.auth's SQL: the
token with its user in one query; permissions then come from the authentication backend."""

from __future__ import annotations

from typing import Any

from django.db.models import Q
from django.http import HttpRequest
from django.utils import timezone

from console.auth import LAST_USED_PRECISION
from console.models import ApiToken, token_digest


def authenticate(self: Any, request: HttpRequest, token: str) -> Any:
    if not token or len(token) > 200:
        return None
    now = timezone.now()
    stale = now - LAST_USED_PRECISION
    found = (
        ApiToken.objects.select_related("user")
        .filter(digest=token_digest(token), revoked_at__isnull=True)
        .first()
    )
    if found is None or not found.user.is_active:
        return None
    if found.last_used_at is None or found.last_used_at < stale:
        ApiToken.objects.filter(pk=found.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale)
        ).update(last_used_at=now)
    return found.user
