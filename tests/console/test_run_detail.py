"""The run page: the workflow graph in each node's state, and the operator's retry."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from console.graph_svg import layout
from console.views_runs import plotly_styles
from orchestration.models import Run, Step, Wait
from orchestration.registry import workflow_get
from orchestration.services import approval_decide, run_submit
from policies.models import PolicyDecision

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _engine_in_process(settings: Any) -> None:
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "AGENT_TIME_SCALE": 0.0,
        "LIVE_EVENTS": False,
        "RETRY_BASE_SECONDS": 0.0,
    }


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def node_state(html: str, node: str) -> str:
    match = re.search(
        rf'<g class="run-graph-node state-([a-z_]+) kind-\w+" data-node="{node}">', html
    )
    assert match, f"no graph node {node!r}"
    return match.group(1)


def test_the_graph_is_laid_out_left_to_right_with_loops_marked() -> None:
    wf = workflow_get("content_pipeline")
    placed = layout(wf)
    assert placed.nodes["research_a"].layer == placed.nodes["research_b"].layer
    assert placed.nodes["draft"].layer > placed.nodes["research_a"].layer
    assert any(loop for _, _, loop in placed.edges)  # the review loops back to the draft


def test_a_completed_run_shows_every_node_done(viewer: Any, operator: Any, drive: Any) -> None:
    run = drive(
        run_submit(workflow="slow_then_echo", input={"seconds": 0}, submitted_by=operator).run.pk
    )
    assert run.status == "succeeded"
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert node_state(html, "slow") == "done" and node_state(html, "echo") == "done"
    assert 'role="group"' in html and "<title" in html and "✓ done" in html
    assert 'href="#step-' in html and 'id="step-' in html


def test_a_failed_run_shows_its_failed_node_and_what_never_ran(
    viewer: Any, operator: Any, drive: Any
) -> None:
    run = drive(run_submit(workflow="bad_handoff", input={}, submitted_by=operator).run.pk)
    assert run.status == "failed"
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert node_state(html, "produce") == "failed"
    assert node_state(html, "consume") == "not_started"
    assert "✗ failed" in html


def test_an_escalated_step_is_shown_escalated(viewer: Any, operator: Any, drive: Any) -> None:
    run = drive(
        run_submit(
            workflow="escalating", input={"fail_attempts": 2, "text": "hi"}, submitted_by=operator
        ).run.pk
    )
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert node_state(html, "act") == "escalated"
    assert "! escalated" in html


def test_the_run_page_query_count_is_pinned(
    viewer: Any, operator: Any, drive: Any, django_assert_num_queries: Any
) -> None:
    run = drive(
        run_submit(workflow="slow_then_echo", input={"seconds": 0}, submitted_by=operator).run.pk
    )
    client = logged_in(viewer)
    client.get(f"/runs/{run.pk}/")
    with django_assert_num_queries(14):
        assert client.get(f"/runs/{run.pk}/").status_code == 200
    assert Run.objects.get(pk=run.pk).status == "succeeded"


# --- operator actions -------------------------------------------------------------------------------


def failed_run(operator: Any, drive: Any) -> Run:
    run = drive(
        run_submit(workflow="flaky_chain", input={"failures": 4}, submitted_by=operator).run.pk
    )
    assert run.status == "failed"
    return run


def test_an_operator_retries_a_failed_run_from_its_page(operator: Any, drive: Any) -> None:
    run = failed_run(operator, drive)
    client = logged_in(operator)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Retry from the failed step" in page and 'name="csrfmiddlewaretoken"' in page
    response = client.post(f"/runs/{run.pk}/retry/", {"reason": "provider is back"})
    assert response.status_code == 303 and response["Location"] == f"/runs/{run.pk}/"
    assert Run.objects.get(pk=run.pk).status == "running"
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Run retried from its failed step." in page
    # A second click (a stale page) is refused with a clear message; nothing changes.
    client.post(f"/runs/{run.pk}/retry/", {"reason": "again"})
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "run_not_failed" in page and "only a failed run can be retried" in page
    assert drive(run.pk).status == "succeeded"


def test_a_retry_without_a_reason_is_refused_on_the_page(operator: Any, drive: Any) -> None:
    run = failed_run(operator, drive)
    client = logged_in(operator)
    client.post(f"/runs/{run.pk}/retry/", {"reason": "  "})
    assert Run.objects.get(pk=run.pk).status == "failed"
    assert "a reason is required" in client.get(f"/runs/{run.pk}/").content.decode()


def test_a_viewer_sees_no_buttons_and_gets_403_if_they_post(
    viewer: Any, operator: Any, drive: Any
) -> None:
    run = failed_run(operator, drive)
    client = logged_in(viewer)
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Retry from the failed step" not in page and "Cancel this run" not in page
    assert "You may view this run but not act on it." in page
    assert client.post(f"/runs/{run.pk}/retry/", {"reason": "let me"}).status_code == 403
    assert client.post(f"/runs/{run.pk}/cancel/", {"reason": "let me"}).status_code == 403
    assert Run.objects.get(pk=run.pk).status == "failed"


def test_an_operator_cancels_an_active_run_with_a_reason(operator: Any) -> None:
    run = run_submit(workflow="slow_then_echo", input={"seconds": 60}, submitted_by=operator).run
    client = logged_in(operator)
    assert "Cancel this run" in client.get(f"/runs/{run.pk}/").content.decode()
    assert client.get(f"/runs/{run.pk}/cancel/").status_code == 405
    client.post(f"/runs/{run.pk}/cancel/", {"reason": "wrong input"})
    assert Run.objects.get(pk=run.pk).status == "cancelled"


def test_the_timeline_is_a_json_island_drawn_by_a_static_script(
    viewer: Any, operator: Any, drive: Any
) -> None:
    run = drive(
        run_submit(workflow="flaky_chain", input={"failures": 1}, submitted_by=operator).run.pk
    )
    client = logged_in(viewer)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    island = re.search(
        r'<script id="run-timeline-data" type="application/json">(.*?)</script>', html, re.S
    )
    assert island, "no timeline data"
    data = json.loads(island.group(1))
    assert {bar["step"] for bar in data["bars"]} == {"flaky"}
    assert [mark["label"] for mark in data["marks"]] == ["attempt failed: provider_unavailable"]
    assert "run_timeline.js" in html and "<script>" not in html
    src = re.search(r'<script src="(/vendor/plotly-[^"]+)"', html).group(1)
    response = client.get(src)
    assert response.status_code == 200 and "immutable" in response["Cache-Control"]
    assert b"plotly" in b"".join(response.streaming_content)[:2000].lower()


def test_plotly_styles_are_a_linked_sheet_the_bundle_will_not_inject_again(
    viewer: Any, operator: Any, drive: Any
) -> None:
    run = drive(
        run_submit(workflow="slow_then_echo", input={"seconds": 0}, submitted_by=operator).run.pk
    )
    client = logged_in(viewer)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    link = re.search(
        r'<link rel="stylesheet" id="plotly.js-style-global" class="no-inline-styles" '
        r'href="(/vendor/plotly-[^"]+\.css)">',
        html,
    )
    assert link, "no link to Plotly's style sheet with the id and class Plotly looks for"
    # Each sheet the bundle would add unless its id is on the page has an element with that id.
    for style_id in plotly_styles().ids:
        assert f'id="{style_id}"' in html
    response = client.get(link.group(1))
    css = response.content.decode()
    assert response["Content-Type"].startswith("text/css")
    assert "immutable" in response["Cache-Control"]
    assert ".js-plotly-plot .plotly .main-svg {position:absolute;" in css
    assert client.get("/vendor/plotly-0.0.1.css").status_code == 404


# --- step details -----------------------------------------------------------------------------------


def test_an_edited_approval_shows_a_field_level_diff(
    viewer: Any, operator: Any, drive: Any, fast_agents: None
) -> None:
    message = "My headset arrived damaged. I would like a refund, please."
    run = drive(run_submit(workflow="refund_desk", input={"message": message}, seed=1).run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    proposed = run.state["proposal"]
    approval_decide(
        wait_id=wait.pk,
        user=operator,
        decision="edit",
        reason="partial refund agreed",
        edited_input={"proposal": {**proposed, "amount": 99.0}},
    )
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert "Edited by the approver" in html
    row = re.search(
        r"<tr><td><code>proposal\.amount</code></td><td>changed</td><td><del>(.*?)</del></td><td><ins>(.*?)</ins>",
        html,
    )
    assert row, "no diff row for proposal.amount"
    assert float(row.group(1)) == proposed["amount"] and float(row.group(2)) == 99.0
    assert "proposal.currency" not in html  # unchanged fields are not listed


def test_policy_decisions_and_token_costs_are_listed_per_step(
    viewer: Any, operator: Any, drive: Any
) -> None:
    run = drive(
        run_submit(workflow="slow_then_echo", input={"seconds": 0}, submitted_by=operator).run.pk
    )
    step = Step.objects.get(run=run, node="echo")
    Step.objects.filter(pk=step.pk).update(
        usage={"prompt_tokens": 120, "completion_tokens": 30, "model": "m"}
    )
    PolicyDecision.objects.create(
        run_id=run.pk,
        step_id=step.pk,
        action="agent:test_echo",
        facts={},
        rule="echo-needs-review",
        outcome="allow",
        tier=2,
        reason="echoes are reviewed",
        created_at=timezone.now(),
    )
    html = logged_in(viewer).get(f"/runs/{run.pk}/").content.decode()
    assert "echo-needs-review" in html and "echoes are reviewed" in html
    assert "120+30 tokens" in html and "120 tokens in, 30 out" in html
    assert f"Trace id: <code>{run.trace_id}</code>" in html


def test_history_reads_as_sentences_with_people_and_workers(operator: Any, drive: Any) -> None:
    run = drive(
        run_submit(workflow="flaky_chain", input={"failures": 4}, submitted_by=operator).run.pk
    )
    client = logged_in(operator)
    client.post(f"/runs/{run.pk}/retry/", {"reason": "provider is back"})
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Submitted by operator" in html
    assert "Flaky retried after provider_unavailable" in html
    assert "Retried from flaky by operator" in html
    assert 'title="run.retried_from_step"' in html
    assert ">worker</td>" in html
