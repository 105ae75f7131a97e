"""Saved views: a user's named filters of home, the run list or the inbox. Personal settings,
like the time zone (not audited); read and written only by their owner."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.http import QueryDict
from django.urls import reverse
from django.utils.http import urlencode

from console.models import SavedView, SavedViewPage

#: Each page's URL name and the filters it reads from its query string (paging is not kept).
PAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    SavedViewPage.HOME: ("console:home", ("workflow", "tenant", "status", "agent", "age", "tier")),
    SavedViewPage.RUNS: ("console:run_list", ("status",)),
    SavedViewPage.INBOX: ("console:inbox", ("kind", "tier")),
}
#: How many views one user may keep.
MAX_SAVED_VIEWS = 100


class SavedViewError(ValueError):
    """A view that cannot be saved; the message says why."""


def saved_view_url(view: SavedView) -> str:
    """The deep link that reproduces the view."""
    path = reverse(PAGES[view.page][0])
    return f"{path}?{view.query}" if view.query else path


def _filters_only(page: str, query: str) -> str:
    params = QueryDict(query[:2000])
    keep = PAGES[page][1]
    return urlencode([(key, params[key][:200]) for key in keep if params.get(key)])


def saved_views_for_user(user: Any) -> list[SavedView]:
    return list(SavedView.objects.filter(user=user).order_by("page", "name"))


def saved_view_save(user: Any, *, page: str, name: str, query: str) -> SavedView:
    """Save ``query``'s filters of ``page`` under ``name`` (replacing a view of that name)."""
    if page not in PAGES:
        raise SavedViewError(f"unknown page {page!r}: views are saved for home, runs or inbox")
    name = " ".join((name or "").split())
    if not name:
        raise SavedViewError("give the view a name")
    if len(name) > 100:
        raise SavedViewError("a view's name is at most 100 characters")
    with transaction.atomic():
        existing = SavedView.objects.select_for_update().filter(user=user)
        if (
            existing.count() >= MAX_SAVED_VIEWS
            and not existing.filter(page=page, name=name).exists()
        ):
            raise SavedViewError(f"you have {MAX_SAVED_VIEWS} saved views: delete one first")
        view, _ = SavedView.objects.update_or_create(
            user=user, page=page, name=name, defaults={"query": _filters_only(page, query)}
        )
    return view


def saved_view_delete(user: Any, view_id: int) -> bool:
    """Delete one of ``user``'s views; False if they have none with that id."""
    deleted, _ = SavedView.objects.filter(user=user, pk=view_id).delete()
    return bool(deleted)
