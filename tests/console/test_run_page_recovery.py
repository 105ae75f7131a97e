"""The run page after the recovery tiers: open escalations with their attempts, tool calls and
agents tried, degraded steps and their reasons, compensations, and the live fragment."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import Client

from console.views import run_live_fragment
from orchestration.models import Run, Wait
from orchestration.services import escalation_resolve, run_submit
from tests.support.stub_provider import StubProvider, StubReply, stub_provider_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def effect_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubProvider]:
    """The side-effecting test capability's provider, served locally."""
    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        yield stub


def submit(user: Any, workflow: str, drive: Callable[[int], Run], **input: Any) -> Run:
    return drive(run_submit(workflow=workflow, input=input, submitted_by=user).run.pk)


def page(user: Any, run: Run) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(f"/runs/{run.pk}/")
    assert response.status_code == 200
    return response.content.decode()


def open_escalation(run: Run) -> Wait:
    return Wait.objects.get(run=run, kind="escalation", status="open")


def panel_of(html: str, wait: Wait) -> str:
    match = re.search(
        rf'<section class="card escalation" id="escalation-{wait.pk}".*?</section>', html, re.S
    )
    assert match is not None, f"no panel for escalation {wait.pk}"
    return match.group(0)


def test_an_escalated_run_shows_the_escalation_with_its_attempts(
    viewer: Any, operator: Any, drive: Callable[[int], Run]
) -> None:
    run = submit(None, "escalating", drive, fail_attempts=2)
    assert run.status == "waiting"
    wait = open_escalation(run)
    html = page(viewer, run)

    assert f'ws-connect="/ws/runs/{run.pk}/"' in html
    assert 'id="run-escalations"' in html
    panel = panel_of(html, wait)
    assert "Escalated: <code>act</code>" in panel and "retries exhausted" in panel
    # the final error, then every attempt: agent, code, message and time
    assert "<code>max_attempts</code>" in panel and "gave up after 2 attempts" in panel
    rows = re.findall(
        r"<tr>\s*<td class=\"num\">(\d)</td>\s*<td>([^<]+)</td>\s*<td><code>([^<]+)</code>", panel
    )
    assert rows == [
        ("1", "test_fails_until", "unavailable"),
        ("2", "test_fails_until", "unavailable"),
    ]
    assert "the service is unavailable (attempt 1)" in panel
    assert "the service is unavailable (attempt 2)" in panel
    for attempt in wait.action["attempts"]:
        assert f'<time datetime="{attempt["at"]}"' in panel
    assert "<dt>Agents tried</dt><dd>test_fails_until</dd>" in panel
    assert "none declared" in panel  # no fallback
    assert "The step made no tool calls." in panel
    # Someone who may only read is told who answers it, and where; no way to act.
    assert f"An operator holding tier {wait.tier} or above" in panel
    assert f'href="/inbox/{wait.pk}/"' in panel
    assert "/resolve</code>" not in panel and "<form" not in panel
    # Someone who may decide for the run is told how to answer it.
    mine = panel_of(page(operator, run), wait)
    assert f"<code>POST /api/v1/escalations/{wait.pk}/resolve</code>" in mine
    assert "<code>Text</code>" in mine
    assert "An operator holding tier" not in mine
    # the step waits, and the waits table names the escalation
    assert 'class="status status-waiting"' in html
    assert "then the step fails" in html
    # with the tier that may answer it, as the inbox says
    assert re.search(
        rf'<td>escalation</td>.*?/inbox/{wait.pk}/.*?<td class="num">{wait.tier}</td>', html, re.S
    )


def test_the_panel_lists_the_failed_tool_calls(
    viewer: Any, drive: Callable[[int], Run], effect_provider: StubProvider
) -> None:
    effect_provider.default = StubReply(status=400, body={"error": "card declined"})
    run = submit(None, "refund_once", drive)
    wait = open_escalation(run)
    panel = panel_of(page(viewer, run), wait)
    calls = wait.action["tool_calls"]
    assert calls and {c["provider"] for c in calls} == {"test-effect"}
    assert "<code>test_effect</code>" in panel and "<td>test-effect</td>" in panel
    assert 'class="status status-failed">failed<' in panel
    assert f"<code>{calls[0]['error_code']}</code>" in panel


def test_a_resolved_escalation_leaves_the_panel(operator: Any, drive: Callable[[int], Run]) -> None:
    run = submit(operator, "escalating", drive, fail_attempts=2)
    wait = open_escalation(run)
    escalation_resolve(wait_id=wait.pk, user=operator, action="retry", reason="back up")
    run = drive(run.pk)
    assert run.status == "succeeded"
    html = page(operator, run)
    assert 'id="run-escalations"' in html
    assert f'id="escalation-{wait.pk}"' not in html
    assert 'class="status status-resolved"' in html  # still in the waits table
    assert "back up" in html


def test_degraded_steps_show_their_reason_and_the_run_lists_them(
    viewer: Any, drive: Callable[[int], Run]
) -> None:
    run = submit(None, "with_degraded", drive, permanent=True)
    assert run.status == "succeeded" and len(run.degraded) == 2
    html = page(viewer, run)
    assert html.count('<span class="badge badge-degraded"') >= 2
    assert "<strong>Degraded:</strong> no sources answered (after refused)" in html
    assert "<strong>Degraded:</strong> partial: 2 of 5 sources" in html
    degraded_list = re.search(r'<ul class="notes degraded-list">.*?</ul>', html, re.S)
    assert degraded_list is not None
    assert "<code>answer</code>: no sources answered (after refused)" in degraded_list.group(0)
    assert "<code>gather</code>: partial: 2 of 5 sources" in degraded_list.group(0)


def test_a_skipped_step_is_shown_degraded_with_who_skipped_it(
    operator: Any, drive: Callable[[int], Run]
) -> None:
    run = submit(operator, "escalating", drive, fail_attempts=2)
    wait = open_escalation(run)
    escalation_resolve(
        wait_id=wait.pk,
        user=operator,
        action="skip",
        reason="done by hand",
        output={"text": "manual"},
    )
    run = drive(run.pk)
    html = page(operator, run)
    assert (
        "<strong>Degraded:</strong> skipped by operator with a supplied value: done by hand" in html
    )


def test_compensations_read_as_undo_and_the_run_shows_compensating(
    viewer: Any, drive: Callable[[int], Run], effect_provider: StubProvider
) -> None:
    run = submit(None, "saga", drive, permanent=True, undo_failures=5)
    assert run.status == "compensating"
    wait = open_escalation(run)
    html = page(viewer, run)
    assert 'class="status status-compensating" role="status">compensating<' in html
    assert '<code>undo: charge</code> <span class="muted">compensation</span>' in html
    assert '<code>undo: reserve</code> <span class="muted">compensation</span>' in html
    panel = panel_of(html, wait)
    assert "Escalated: <code>undo: reserve</code>" in panel
    assert "undoes a completed step" in panel
    assert f'ws-connect="/ws/runs/{run.pk}/"' in html  # still active


def test_the_live_fragment_carries_the_escalations_out_of_band(
    operator: Any, submitter: Any, drive: Callable[[int], Run]
) -> None:
    run = submit(operator, "escalating", drive, fail_attempts=2)
    wait = open_escalation(run)
    fragment = run_live_fragment(operator, run.pk)
    assert fragment is not None
    assert '<div id="run-escalations" hx-swap-oob="true">' in fragment
    assert f'id="escalation-{wait.pk}"' in fragment
    assert run_live_fragment(submitter, run.pk) is None  # not theirs

    escalation_resolve(wait_id=wait.pk, user=operator, action="abort", reason="stop it")
    fragment = run_live_fragment(operator, run.pk)
    assert fragment is not None
    assert '<div id="run-escalations" hx-swap-oob="true">' in fragment  # emptied, not dropped
    assert f'id="escalation-{wait.pk}"' not in fragment
    assert 'class="status status-failed"' in fragment
