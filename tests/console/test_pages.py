"""The console's pages: login, the run list, a run's page, and who may see what."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from console import views
from orchestration.models import Run
from orchestration.services import run_submit
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

RESEARCH_INPUT = {"question": "How do teams run agents in production?", "max_subquestions": 3}


def submit(user: Any, workflow: str = "research_brief", **input: Any) -> Run:
    return run_submit(
        workflow=workflow, input=input or RESEARCH_INPUT, submitted_by=user, seed=7
    ).run


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- login --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/runs/1/"])
def test_pages_redirect_anonymous_users_to_login(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={path}"


def test_login_page_logs_in_and_logout_logs_out(client: Client, viewer: Any) -> None:
    page = client.get("/accounts/login/")
    assert page.status_code == 200
    assert b'name="username"' in page.content
    assert b"//unpkg.com" not in page.content and b"cdn" not in page.content.lower()

    response = client.post(
        "/accounts/login/", {"username": "viewer", "password": "correct horse battery staple"}
    )
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200

    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert client.get("/").status_code == 302


def test_pages_load_htmx_and_the_stylesheet_locally(viewer: Any) -> None:
    html = logged_in(viewer).get("/").content.decode()
    assert '<script src="/static/django_htmx/htmx-2.min.js" defer></script>' in html
    assert "/static/django_htmx/ext/hx-ws-2.min.js" in html
    assert "/static/console/console.css" in html
    assert not re.search(r"""(src|href)=["']https?://""", html)


# --- run list -----------------------------------------------------------------------------------


def test_run_list_shows_runs_newest_first_with_utc_times(viewer: Any) -> None:
    older = submit(None)
    newer = submit(None, "content_pipeline", topic="Queues")
    html = logged_in(viewer).get("/runs/").content.decode()

    assert html.index(f">#{newer.pk}<") < html.index(f">#{older.pk}<")
    assert "content_pipeline" in html and "research_brief" in html
    iso = older.created_at.isoformat()
    assert f'<time datetime="{iso}" title="{iso}">' in html
    assert f"{older.created_at:%Y-%m-%d %H:%M:%S} UTC" in html
    # The first page follows new runs live.
    assert 'ws-connect="/ws/runs/"' in html


def test_run_list_empty_state(viewer: Any) -> None:
    html = logged_in(viewer).get("/runs/").content.decode()
    assert "No runs yet." in html


def test_run_list_filters_by_status(viewer: Any, drive: Callable[[int], Run]) -> None:
    done = submit(None)
    drive(done.pk)
    queued = submit(None)
    client = logged_in(viewer)

    html = client.get("/runs/?status=succeeded").content.decode()
    assert f">#{done.pk}<" in html and f">#{queued.pk}<" not in html
    assert 'ws-connect="/ws/runs/?status=succeeded"' in html

    html = client.get("/runs/?status=failed").content.decode()
    assert "No failed runs." in html


def test_run_list_filters_by_what_a_run_waits_for(viewer: Any, drive: Callable[[int], Run]) -> None:
    on_event = drive(submit(None, "event_timeout_continue").pk)
    on_approval = drive(
        submit(None, "content_pipeline", topic="Durable queues").pk  # waits at its approval
    )
    done = drive(submit(None).pk)
    assert on_event.status == on_approval.status == "waiting" and done.status == "succeeded"
    client = logged_in(viewer)

    html = client.get("/runs/?waiting=event").content.decode()
    assert f">#{on_event.pk}<" in html
    assert f">#{on_approval.pk}<" not in html and f">#{done.pk}<" not in html
    assert 'ws-connect="/ws/runs/?waiting=event"' in html
    assert '<option value="event" selected>' in html
    # The live fragment is filtered the same way.
    fragment = views.run_list_fragment(viewer, waiting="approval")
    assert f">#{on_approval.pk}<" in fragment and f">#{on_event.pk}<" not in fragment

    html = client.get("/runs/?waiting=escalation&status=waiting").content.decode()
    assert "No waiting run waits for an operator (escalated) now." in html
    assert 'ws-connect="/ws/runs/?status=waiting&amp;waiting=escalation"' in html
    # An unknown kind filters nothing (as an unknown status does).
    html = client.get("/runs/?waiting=nonsense").content.decode()
    assert all(f">#{r.pk}<" in html for r in (on_event, on_approval, done))
    # The home page's count links to the list.
    assert 'href="/runs/?waiting=event"' in client.get("/").content.decode()


def test_run_list_pages_with_a_cursor(viewer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    runs = [submit(None) for _ in range(3)]
    client = logged_in(viewer)

    first = client.get("/runs/").content.decode()
    assert (
        f">#{runs[2].pk}<" in first
        and f">#{runs[1].pk}<" in first
        and f">#{runs[0].pk}<" not in first
    )
    next_url = re.search(r'<a href="(\?cursor=[^"]+)">Older runs', first)
    assert next_url is not None

    second = client.get("/runs/" + next_url.group(1).replace("&amp;", "&")).content.decode()
    assert f">#{runs[0].pk}<" in second and f">#{runs[1].pk}<" not in second
    assert "Older runs" not in second
    assert "ws-connect" not in second  # older pages stay still


def test_run_list_refuses_a_bad_cursor(viewer: Any) -> None:
    assert logged_in(viewer).get("/runs/?cursor=nonsense").status_code == 400


def test_run_list_shows_only_the_runs_a_user_may_see(viewer: Any, submitter: Any) -> None:
    theirs = submit(None)
    mine = submit(submitter)
    html = logged_in(submitter).get("/runs/").content.decode()
    assert f">#{mine.pk}<" in html
    assert f">#{theirs.pk}<" not in html


def test_run_list_query_count_does_not_grow_with_runs(
    viewer: Any, django_assert_num_queries: Any
) -> None:
    client = logged_in(viewer)
    for _ in range(3):
        submit(None)
    # session, user, the user's permissions (direct and via groups, one query), the page of runs
    with django_assert_num_queries(4):
        assert client.get("/runs/").status_code == 200
    for _ in range(5):
        submit(None)
    with django_assert_num_queries(4):
        assert client.get("/runs/").status_code == 200


# --- run page -----------------------------------------------------------------------------------


def test_run_page_shows_steps_state_and_history_of_a_finished_run(
    viewer: Any, requester: Any, drive: Callable[[int], Run]
) -> None:
    run = drive(submit(requester).pk)
    assert run.status == "succeeded"
    response = logged_in(viewer).get(f"/runs/{run.pk}/")
    assert response.status_code == 200
    html = response.content.decode()

    assert f"Run #{run.pk}" in html
    assert 'class="status status-succeeded"' in html
    for key in ("plan", "answer", "answer[0]", "answer[2]", "merge"):
        assert f"<code>{key}</code>" in html
    for agent in ("planner", "subquestion_worker", "merger"):
        assert agent in html
    # current state and its versions, with writers
    for key in ("question", "subquestions", "answers", "brief"):
        assert f"<code>{key}</code>" in html
    assert "submit" in html and "map:answer" in html
    # inputs and outputs, collapsible
    assert "<summary>Run input</summary>" in html and "<summary>Run output" in html
    assert "How do teams run agents in production?" in html
    # the audit trail, as sentences (the verb on hover) with actors as people or workers
    for verb in (
        "run.submitted",
        "step.claimed",
        "step.succeeded",
        "state.written",
        "run.succeeded",
    ):
        assert f'title="{verb}"' in html
    assert "Submitted by requester" in html and "Run finished successfully" in html
    # a finished run does not open a websocket
    assert "ws-connect" not in html


def test_run_page_shows_an_open_approval_and_connects_for_live_updates(
    viewer: Any, drive: Callable[[int], Run]
) -> None:
    run = drive(submit(None, "content_pipeline", topic="Durable queues").pk)
    assert run.status == "waiting"
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()

    assert 'class="status status-waiting"' in html
    assert "publishing is visible to the public" in html
    assert 'class="status status-open"' in html
    assert f'ws-connect="/ws/runs/{run.pk}/"' in html
    for section in ("run-summary", "run-steps", "run-waits", "run-state", "run-io", "run-audit"):
        assert f'id="{section}"' in html


def test_run_page_of_a_run_the_user_may_not_see_is_404(viewer: Any, submitter: Any) -> None:
    run = submit(None)
    assert logged_in(submitter).get(f"/runs/{run.pk}/").status_code == 404
    assert logged_in(UserFactory(username="nobody")).get(f"/runs/{run.pk}/").status_code == 404


def test_run_page_of_a_missing_run_is_404(viewer: Any) -> None:
    assert logged_in(viewer).get("/runs/999999/").status_code == 404


def test_submitter_sees_their_own_run(submitter: Any) -> None:
    run = submit(submitter)
    assert logged_in(submitter).get(f"/runs/{run.pk}/").status_code == 200


def test_run_page_escapes_user_input(viewer: Any) -> None:
    run = submit(None, "content_pipeline", topic="<script>alert(1)</script>")
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
