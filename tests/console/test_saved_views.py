"""Saved views: an operator saves the current filters of home, the run list or the inbox under a
name; their views are listed (theirs only), open as deep links that reproduce the filters, and
can be deleted. The inbox's own filters (kind, tier) narrow the list and its live stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from console.models import SavedView
from orchestration.models import Run, Wait
from orchestration.services import run_submit
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def save(client: Client, page: str, name: str, query: str) -> Any:
    return client.post("/views/", {"page": page, "name": name, "query": query})


@pytest.mark.parametrize(
    ("page", "path", "query", "kept"),
    [
        ("home", "/", "status=failed&tier=2&page=3", "status=failed&tier=2"),
        ("runs", "/runs/", "status=waiting&extra=abc", "status=waiting"),
        ("inbox", "/inbox/", "kind=escalation&tier=1&junk=1", "kind=escalation&tier=1"),
    ],
)
def test_each_page_saves_its_filters_as_a_deep_link(
    viewer: Any, page: str, path: str, query: str, kept: str
) -> None:
    client = logged_in(viewer)
    html = client.get(f"{path}?{query}").content.decode()
    assert 'action="/views/"' in html and f'name="page" value="{page}"' in html
    assert 'name="query" value="' in html  # the page's current query, to save

    response = save(client, page, "  My   view ", query)
    view = SavedView.objects.get(user=viewer)
    assert response.status_code == 303 and response["Location"] == f"/views/?saved={view.pk}"
    assert (view.page, view.name, view.query) == (page, "My view", kept)  # no paging, no junk

    listing = client.get(response["Location"]).content.decode()
    assert f'href="{path}?{kept.replace("&", "&amp;")}"' in listing and "My view" in listing
    assert 'id="view-saved"' in listing
    assert client.get(f"{path}?{kept}").status_code == 200  # the deep link opens the page


def test_saving_a_name_again_replaces_it_and_bad_input_is_refused_in_place(viewer: Any) -> None:
    client = logged_in(viewer)
    save(client, "home", "failed", "status=failed")
    save(client, "home", "failed", "status=failed&tier=3")
    assert list(SavedView.objects.values_list("name", "query")) == [
        ("failed", "status=failed&tier=3")
    ]

    for page, name, says in (
        ("home", "   ", "give the view a name"),
        ("audit", "x", "unknown page"),
    ):
        response = save(client, page, name, "")
        assert response.status_code == 400
        assert says in response.content.decode()
    assert SavedView.objects.count() == 1


def test_views_are_per_user_and_deleted_only_by_their_owner(viewer: Any) -> None:
    other = UserFactory(username="other", permissions=["orchestration.view_run"])
    mine = logged_in(viewer)
    save(mine, "runs", "waiting", "status=waiting")
    view = SavedView.objects.get()

    theirs = logged_in(other)
    assert "waiting" not in theirs.get("/views/").content.decode()
    assert "No saved views yet" in theirs.get("/views/").content.decode()
    assert theirs.post(f"/views/{view.pk}/delete/").status_code == 404
    assert SavedView.objects.filter(pk=view.pk).exists()

    assert mine.get(f"/views/{view.pk}/delete/").status_code == 405  # a POST, with CSRF
    response = mine.post(f"/views/{view.pk}/delete/")
    assert response.status_code == 303 and response["Location"] == "/views/"
    assert not SavedView.objects.exists()


def test_the_inbox_filters_narrow_the_list_and_its_live_stream(
    operator: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    run = drive(
        run_submit(workflow="content_pipeline", input={"topic": "Q"}, submitted_by=requester).run.pk
    )
    approval = Wait.objects.get(run=run, kind="approval", status="open")
    run = drive(run_submit(workflow="escalating", input={"fail_attempts": 9}).run.pk)
    escalation = Wait.objects.get(run=run, kind="escalation", status="open")

    client = logged_in(operator)
    html = client.get("/inbox/?kind=escalation").content.decode()
    assert f'id="item-{escalation.pk}"' in html and f'id="item-{approval.pk}"' not in html
    assert 'ws-connect="/ws/inbox/?kind=escalation"' in html

    html = client.get("/inbox/?kind=approval&tier=3").content.decode()
    assert 'id="item-' not in html and "No open decision matches these filters" in html

    from console.views_inbox import inbox_fragment

    live = inbox_fragment(operator, "kind=approval")
    assert f'id="item-{approval.pk}"' in live and f'id="item-{escalation.pk}"' not in live
