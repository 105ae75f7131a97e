"""Escalation drills: a policy admin fires a synthetic escalation (tier, tenant) through the real
engine and sees past drills with how long each took to be answered."""

from __future__ import annotations

from typing import cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from orchestration.errors import InvalidInput, NotFound, PermissionDenied
from orchestration.selectors import drill_list_for_user, tenants_visible_to
from orchestration.services import drill_fire


@login_required
@require_http_methods(["GET", "POST"])
def drill_list(request: HttpRequest) -> HttpResponse:
    user = cast(User, request.user)
    try:
        drills = drill_list_for_user(user)
    except PermissionDenied:
        raise DjangoPermissionDenied from None
    error = ""
    status = 200
    if request.method == "POST":
        try:
            tier = int(request.POST.get("tier", ""))
        except ValueError:
            tier = 0
        try:
            run = drill_fire(
                user=user,
                tier=tier,
                tenant=request.POST.get("tenant", ""),
                note=request.POST.get("note", ""),
            )
        except (InvalidInput, NotFound) as exc:
            error, status = exc.message, 400
        except PermissionDenied:
            raise DjangoPermissionDenied from None
        else:
            messages.success(request, f"Drill fired: run {run.pk}, tier {tier}.")
            return redirect("console:drill_list")
    context = {
        "drills": drills,
        "tenants": tenants_visible_to(user),
        "tiers": [1, 2, 3],
        "error": error,
    }
    return render(request, "console/drills.html", context, status=status)
