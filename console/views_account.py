"""A user's own account: settings (time zone) and API tokens."""

from __future__ import annotations

import zoneinfo

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from console.accounts import (
    DEFAULT_EXPIRY_DAYS,
    EXPIRY_CHOICES,
    AccountError,
    profile_for_user,
    profile_update,
    token_issue,
    token_revoke,
    tokens_for_user,
)
from console.middleware import SESSION_TIME_ZONE
from console.models import ApiToken


@login_required
@require_http_methods(["GET", "POST"])
def account(request: HttpRequest) -> HttpResponse:
    profile = profile_for_user(request.user)
    error = ""
    saved = False
    status = 200
    if request.method == "POST":
        try:
            profile = profile_update(request.user, time_zone=request.POST.get("time_zone", ""))
            request.session[SESSION_TIME_ZONE] = profile.time_zone
            timezone.activate(zoneinfo.ZoneInfo(profile.time_zone))
            request.user_time_zone = profile.time_zone  # type: ignore[attr-defined]  # a per-request attribute HttpRequest does not declare
            saved = True
        except AccountError as exc:
            error, status = str(exc), 400
    return render(
        request,
        "console/account/settings.html",
        {
            "profile": profile,
            "zones": sorted(zoneinfo.available_timezones()),
            "error": error,
            "saved": saved,
        },
        status=status,
    )


def _parse_expiry(value: str) -> int | None:
    if value in ("", "never"):
        return None
    try:
        return int(value)
    except ValueError:
        raise AccountError("choose how many days the token lasts") from None


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request: HttpRequest) -> HttpResponse:
    error = ""
    status = 200
    created: tuple[ApiToken, str] | None = None
    if request.method == "POST":
        try:
            days = _parse_expiry(request.POST.get("expires_days", str(DEFAULT_EXPIRY_DAYS)))
            created = token_issue(request.user, request.POST.get("name", ""), days)
        except AccountError as exc:
            error, status = str(exc), 400
    context = {
        "tokens": tokens_for_user(request.user),
        "choices": EXPIRY_CHOICES,
        "default_days": DEFAULT_EXPIRY_DAYS,
        "created": created[0] if created else None,
        "raw": created[1] if created else "",
        "error": error,
    }
    response = render(request, "console/account/tokens.html", context, status=status)
    if created:
        response["Cache-Control"] = "no-store"  # the raw value must not be kept by any cache
    return response


@login_required
@require_POST
def token_revoke_view(request: HttpRequest, token_id: int) -> HttpResponse:
    try:
        token_revoke(request.user, token_id)
    except ApiToken.DoesNotExist:
        raise Http404("no such token of yours") from None
    return redirect("console:account_tokens")
