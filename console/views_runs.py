"""An operator's actions on a run from its page: retry a failed run from its failed step, cancel
a run that has not ended. Each is a POST with CSRF and a required reason; the service decides
(and audits) and refuses with a code, shown on the page."""

from __future__ import annotations

from typing import cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from orchestration import services
from orchestration.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from orchestration.selectors import run_get_for_decision

REASON_MAX = 2000


def _act(request: HttpRequest, run_id: int, what: str) -> HttpResponse:
    user = cast(User, request.user)
    try:
        run = run_get_for_decision(user, run_id)
    except NotFound:
        raise Http404(f"no run {run_id}") from None
    except PermissionDenied:
        raise DjangoPermissionDenied from None
    reason = request.POST.get("reason", "").strip()[:REASON_MAX]
    back = HttpResponseRedirect(reverse("console:run_detail", args=[run.pk]))
    back.status_code = 303
    if not reason:
        messages.error(request, f"Say why you {what} this run: a reason is required.")
        return back
    try:
        if what == "retry":
            services.run_retry(run_id=run.pk, user=user, reason=reason)
            messages.success(request, "Run retried from its failed step.")
        else:
            services.run_cancel(run_id=run.pk, user=user, reason=reason)
            messages.success(request, "Run cancelled.")
    except PermissionDenied:
        raise DjangoPermissionDenied from None
    except (Conflict, InvalidInput) as exc:
        messages.error(request, f"Not done ({exc.code}): {exc.message}")
    return back


@login_required
@require_POST
def run_retry(request: HttpRequest, run_id: int) -> HttpResponse:
    return _act(request, run_id, "retry")


@login_required
@require_POST
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    return _act(request, run_id, "cancel")
