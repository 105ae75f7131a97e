"""Writes for a user's own account: API tokens and personal settings. Audited; the raw value of a
token is never recorded anywhere."""

from __future__ import annotations

import zoneinfo
from datetime import timedelta
from typing import Any

from axes.signals import user_locked_out
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.db import transaction
from django.dispatch import receiver
from django.http import HttpRequest
from django.utils import timezone

from audit.services import Entry, audit_record, audit_record_alone
from audit.verbs import ActorType, Verb
from console.middleware import remember_time_zone
from console.models import ApiToken, UserProfile
from policies.roles import TENANT_SUBMITTER, tenant_grant
from policies.tenants import tenant_by_slug

#: Expiry choices offered on the tokens page, in days (None: never). The default is the first.
EXPIRY_CHOICES: list[int | None] = [90, 30, 7, 365, None]
DEFAULT_EXPIRY_DAYS = 90
MAX_EXPIRY_DAYS = 365


class AccountError(ValueError):
    """Input to an account service that cannot be accepted; the message says why."""


def token_issue(
    user: Any, name: str, expires_days: int | None = DEFAULT_EXPIRY_DAYS
) -> tuple[ApiToken, str]:
    """Make a token for ``user``; returns it with its raw value, which only the caller sees."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise AccountError("a token needs a name of 1 to 100 characters")
    if expires_days is not None and not 1 <= expires_days <= MAX_EXPIRY_DAYS:
        raise AccountError(f"a token expires after 1 to {MAX_EXPIRY_DAYS} days")
    expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
    with transaction.atomic():
        token, raw = ApiToken.issue(user, name, expires_at=expires_at)
        audit_record(
            Entry(
                verb=Verb.TOKEN_ISSUED,
                object_type="api_token",
                object_id=token.pk,
                actor_type=ActorType.HUMAN,
                actor_id=str(user.pk),
                data={
                    "name": name,
                    "prefix": token.prefix,
                    "user": str(user.pk),
                    "expires_at": expires_at.isoformat() if expires_at else None,
                },
            )
        )
    return token, raw


def token_revoke(user: Any, token_id: int) -> ApiToken:
    """Revoke one of ``user``'s own tokens (revoking twice is harmless)."""
    with transaction.atomic():
        token = ApiToken.objects.select_for_update().filter(user=user, pk=token_id).first()
        if token is None:
            raise ApiToken.DoesNotExist(token_id)
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            audit_record(
                Entry(
                    verb=Verb.TOKEN_REVOKED,
                    object_type="api_token",
                    object_id=token.pk,
                    actor_type=ActorType.HUMAN,
                    actor_id=str(user.pk),
                    data={"name": token.name, "prefix": token.prefix, "user": str(user.pk)},
                )
            )
    return token


def tokens_for_user(user: Any) -> list[ApiToken]:
    return list(ApiToken.objects.filter(user=user).order_by("-created_at"))


def profile_for_user(user: Any) -> UserProfile:
    """The user's settings, created with the defaults the first time."""
    profile, _ = UserProfile.objects.get_or_create(user=user)
    return profile


def profile_update(user: Any, *, time_zone: str) -> UserProfile:
    time_zone = (time_zone or "").strip()
    if time_zone not in zoneinfo.available_timezones():
        raise AccountError(f"unknown time zone {time_zone!r}: use a name like Europe/Berlin")
    with transaction.atomic():
        profile = profile_for_user(user)
        profile.time_zone = time_zone
        profile.save(update_fields=["time_zone"])
    return profile


# --- service accounts ----------------------------------------------------------------------------


def service_account_ensure(
    username: str,
    *,
    tenants: list[str],
    token_name: str,
    expires_days: int | None = DEFAULT_EXPIRY_DAYS,
) -> tuple[Any, ApiToken, str]:
    """Create (or update) a user that only submits work, for ``tenants`` (the default tenant if
    none), and give it a new token. Such a user has no password: it cannot log in to the console."""
    model = get_user_model()
    with transaction.atomic():
        found = [tenant_by_slug(slug) for slug in (tenants or [""])]
        user, created = model._default_manager.get_or_create(username=username)
        if created:
            user.set_unusable_password()
            user.save()
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="orchestration", codename="add_run")
        )
        for tenant in found:
            tenant_grant(user, tenant, TENANT_SUBMITTER)
        token, raw = token_issue(user, token_name, expires_days)
    return user, token, raw


# --- logins ------------------------------------------------------------------------------------


def _address(request: HttpRequest | None) -> str:
    return (
        getattr(request, "axes_ip_address", None)
        or (request.META.get("REMOTE_ADDR") if request else "")
    ) or ""


@receiver(user_login_failed, dispatch_uid="console.accounts.login_failed")
def _login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    """Every failed login is audited (the username tried and the address, never the password)."""
    username = str(credentials.get("username", ""))[:150]
    audit_record_alone(
        Entry(
            verb=Verb.LOGIN_FAILED,
            object_type="login",
            object_id=username,
            actor_type=ActorType.HUMAN,
            actor_id=username,
            data={"username": username, "address": _address(request)},
        )
    )


@receiver(user_locked_out, dispatch_uid="console.accounts.locked_out")
def _locked_out(
    sender: Any,
    request: HttpRequest | None = None,
    username: str | None = None,
    ip_address: str | None = None,
    **kwargs: Any,
) -> None:
    username = (username or "")[:150]
    audit_record_alone(
        Entry(
            verb=Verb.LOGIN_LOCKED_OUT,
            object_type="login",
            object_id=username,
            actor_type=ActorType.HUMAN,
            actor_id=username,
            data={"username": username, "address": ip_address or _address(request)},
        )
    )


@receiver(user_logged_in, dispatch_uid="console.accounts.logged_in")
def _logged_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if request is not None:
        remember_time_zone(request, user)
