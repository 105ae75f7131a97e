"""Home ("what needs me now"): counts by status and by reason, pools, filters as deep links,
honest totals with pages, empty states, relative times, and its query count."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from console import views_inbox
from orchestration import selectors
from orchestration.models import Run
from orchestration.selectors import HomeFilters, home_counts_for_user
from orchestration.services import run_submit

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def submit(user: Any, workflow: str = "research_brief", **input: Any) -> Run:
    input = input or {"question": "How do teams run agents in production?", "max_subquestions": 3}
    return run_submit(workflow=workflow, input=input, submitted_by=user).run


def test_home_is_the_root_and_the_run_list_moved(viewer: Any) -> None:
    client = logged_in(viewer)
    html = client.get("/").content.decode()
    assert "What needs you now" in html and 'ws-connect="/ws/home/"' in html
    assert client.get("/runs/").status_code == 200
    assert "<script>" not in html


def test_home_counts_runs_waits_escalations_and_pools(
    viewer: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    submit(None)  # queued
    drive(submit(requester, "content_pipeline", topic="Queues").pk)  # waits for approval
    drive(run_submit(workflow="escalating", input={"fail_attempts": 2}, submitted_by=None).run.pk)
    counts = home_counts_for_user(viewer)
    assert counts.by_status == {"queued": 1, "waiting": 2}
    assert counts.waiting_decision == 1 and counts.escalated == 1 and counts.waiting_event == 0
    assert counts.escalated_by_reason["retries exhausted"] == 1
    assert {p["pool"]: p["queued"] for p in counts.pools}.get("research", 0) + sum(
        p["queued"] for p in counts.pools if p["pool"] != "research"
    ) >= 1
    assert counts.last_event_id > 0

    html = logged_in(viewer).get("/").content.decode()
    assert '<span class="num" data-count="decision">1</span> waiting for a decision' in html
    assert '<span class="num" data-count="escalated">1</span> escalated' in html
    assert "retries exhausted" in html


def test_filters_are_get_params_and_counts_are_honest(
    viewer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(3):
        submit(None)
    submit(None, "content_pipeline", topic="Queues")
    counts = home_counts_for_user(viewer, HomeFilters(workflow="content_pipeline"))
    assert counts.by_status == {"queued": 1}

    monkeypatch.setattr(views_inbox, "home_runs_for_user", _small_pages(2))
    client = logged_in(viewer)
    html = client.get("/?workflow=research_brief").content.decode()
    assert 'Runs <span class="muted">(3)</span>' in html
    assert "page 1 of 2" in html and 'href="?workflow=research_brief&amp;page=2"' in html
    assert 'ws-connect="/ws/home/?workflow=research_brief"' in html
    html = client.get("/?workflow=research_brief&page=2").content.decode()
    assert "page 2 of 2" in html
    # relative time, exact time on hover
    assert "just now</time>" in html and ' UTC">' in html


def _small_pages(per_page: int) -> Any:
    def page(user: Any, filters: Any = None, *, page: int = 1, counts: Any = None) -> Any:
        return selectors.home_runs_for_user(
            user, filters, page=page, per_page=per_page, counts=counts
        )

    return page


def test_empty_states_say_what_to_do(viewer: Any) -> None:
    client = logged_in(viewer)
    assert "Submit a run through the API" in client.get("/").content.decode()
    assert "Clear the filters" in client.get("/?workflow=nothing").content.decode()


def test_bad_filter_values_are_ignored_not_500(viewer: Any) -> None:
    client = logged_in(viewer)
    assert client.get("/?age=abc&tier=9&status=bogus&page=x").status_code == 200


def test_home_shows_only_runs_the_user_may_see(submitter: Any) -> None:
    submit(None)
    mine = submit(submitter)
    counts = home_counts_for_user(submitter)
    assert counts.by_status == {"queued": 1}
    assert f">#{mine.pk}<" in logged_in(submitter).get("/").content.decode()


def test_home_query_count_does_not_grow_with_runs(
    viewer: Any, django_assert_num_queries: Any
) -> None:
    client = logged_in(viewer)
    for _ in range(2):
        submit(None)
    # session, user, permissions, last event, counts by status (which give the page's total),
    # waits, pools, ceiling, the page's rows, the tenant filter's choices
    with django_assert_num_queries(10):
        assert client.get("/").status_code == 200
    for _ in range(5):
        submit(None)
    with django_assert_num_queries(10):
        assert client.get("/").status_code == 200


def test_runs_near_their_ceiling_say_how_near_and_which_workflow(viewer: Any) -> None:
    from decimal import Decimal

    from django.utils import timezone

    from policies.models import ScopeKind, SpendScope

    near, far = submit(None), submit(None)
    for run, spent in ((near, "0.0009"), (far, "0.0001")):
        SpendScope.objects.create(
            kind=ScopeKind.RUN,
            key=str(run.pk),
            limit=Decimal("0.0015"),
            soft_ratio=Decimal("0.6"),
            spent=Decimal(spent),
            updated_at=timezone.now(),
        )
    (row,) = home_counts_for_user(viewer).near_ceiling
    assert (row["run_id"], row["workflow"], row["status"], row["percent"]) == (
        near.pk,
        "research_brief",
        "queued",
        60,
    )
    html = logged_in(viewer).get("/").content.decode()
    assert f">#{near.pk}</a> research_brief" in html and "60 % used: $0.0009 of $0.0015" in html
    assert f">#{far.pk}</a>" not in html.split('id="h-ceiling"')[1].split("</section>")[0]
