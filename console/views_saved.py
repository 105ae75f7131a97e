"""Saved views: save the current filters of home, the run list or the inbox under a name; list,
open (a deep link) and delete one's own."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from console.models import SavedViewPage
from console.saved_views import (
    SavedViewError,
    saved_view_delete,
    saved_view_save,
    saved_view_url,
    saved_views_for_user,
)


def _page(request: HttpRequest, *, error: str = "", status: int = 200) -> HttpResponse:
    views = [
        {"view": view, "url": saved_view_url(view), "page": SavedViewPage(view.page).label}
        for view in saved_views_for_user(request.user)
    ]
    saved = request.GET.get("saved", "")
    context = {
        "views": views,
        "error": error,
        "saved": next((v for v in views if str(v["view"].pk) == saved), None),
    }
    return render(request, "console/saved_views.html", context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def saved_views(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return _page(request)
    try:
        view = saved_view_save(
            request.user,
            page=request.POST.get("page", ""),
            name=request.POST.get("name", ""),
            query=request.POST.get("query", ""),
        )
    except SavedViewError as exc:
        return _page(request, error=str(exc), status=400)
    return HttpResponseRedirect(f"{reverse('console:saved_views')}?saved={view.pk}", status=303)


@login_required
@require_POST
def saved_view_delete_view(request: HttpRequest, view_id: int) -> HttpResponse:
    if not saved_view_delete(request.user, view_id):
        raise Http404(f"no saved view {view_id}")
    return HttpResponseRedirect(reverse("console:saved_views"), status=303)
