"""POST /api/v1/runs/{id}/retry: a failed run runs again from its failed step."""

from __future__ import annotations

from typing import Any

import pytest

from orchestration.models import Run, Step
from orchestration.services import run_submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def failed_run(operator: Any, drive: Any, no_backoff: None) -> Run:
    run = run_submit(workflow="flaky_chain", input={"failures": 4}, submitted_by=operator).run
    run = drive(run.pk)
    assert run.status == "failed"
    return run


def test_retry_runs_a_failed_run_again_from_its_failed_step(operator_client, failed_run, drive):
    response = operator_client.post(
        f"/api/v1/runs/{failed_run.pk}/retry",
        {"reason": "provider is back"},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "running"
    again = operator_client.post(
        f"/api/v1/runs/{failed_run.pk}/retry", {"reason": "twice"}, content_type="application/json"
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_not_failed"
    run = drive(failed_run.pk)
    assert run.status == "succeeded"
    assert Step.objects.get(run=run).output == {"text": "ok on attempt 5"}


def test_retry_needs_a_reason(operator_client, failed_run):
    response = operator_client.post(
        f"/api/v1/runs/{failed_run.pk}/retry", {}, content_type="application/json"
    )
    assert response.status_code == 422
    assert Run.objects.get(pk=failed_run.pk).status == "failed"


def test_retry_by_someone_who_may_only_view_is_403(viewer, client_for, failed_run):
    response = client_for(viewer).post(
        f"/api/v1/runs/{failed_run.pk}/retry", {"reason": "let me"}, content_type="application/json"
    )
    assert response.status_code == 403
    assert Run.objects.get(pk=failed_run.pk).status == "failed"


def test_retry_of_an_unknown_run_is_404(operator_client):
    response = operator_client.post(
        "/api/v1/runs/987654/retry", {"reason": "x"}, content_type="application/json"
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "run_not_found"


# --- skipping the failed step instead -------------------------------------------------------------


def test_skip_gives_the_failed_step_a_value_and_the_run_completes(
    operator_client, failed_run, drive
):
    url = f"/api/v1/runs/{failed_run.pk}/skip"
    wrong = operator_client.post(
        url, {"reason": "sent by hand", "output": {"text": 5}}, content_type="application/json"
    )
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "output_contract"
    assert Run.objects.get(pk=failed_run.pk).status == "failed"
    response = operator_client.post(
        url,
        {"reason": "sent by hand", "output": {"text": "by hand"}},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    again = operator_client.post(
        url, {"reason": "twice", "output": {"text": "x"}}, content_type="application/json"
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_not_failed"
    run = drive(failed_run.pk)
    assert run.status == "succeeded" and run.state["text"] == "by hand"
    assert Step.objects.get(run=run).degraded.startswith("skipped by operator")


def test_skip_needs_a_reason_and_a_viewer_may_not(operator_client, viewer, client_for, failed_run):
    url = f"/api/v1/runs/{failed_run.pk}/skip"
    body = {"output": {"text": "x"}}
    assert operator_client.post(url, body, content_type="application/json").status_code == 422
    refused = client_for(viewer).post(
        url, {**body, "reason": "let me"}, content_type="application/json"
    )
    assert refused.status_code == 403
    assert Run.objects.get(pk=failed_run.pk).status == "failed"
