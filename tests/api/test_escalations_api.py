"""Escalations through the REST API: failed steps waiting for an operator, who sees them, and
every answer an operator can give (retry, skip with a value, abort), with the refusals that
change nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Step, Wait
from orchestration.recovery import expire_waits
from orchestration.services import escalation_resolve, run_cancel
from tests.support.stub_provider import StubProvider, stub_provider_server

pytestmark = pytest.mark.django_db

ESCALATIONS = "/api/v1/escalations"
MISSING = 987_654_321


@pytest.fixture(autouse=True)
def _no_backoff(no_backoff: None) -> None:
    """Every run here retries at once."""


@pytest.fixture
def effect_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubProvider]:
    """The side-effecting test capability's provider, served locally (the saga uses it)."""
    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        yield stub


def post_json(client: Client, path: str, body: Any, **extra: Any) -> Any:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data, content_type="application/json", **extra)


def resolve(client: Client, wait_id: int, **body: Any) -> Any:
    return post_json(client, f"{ESCALATIONS}/{wait_id}/resolve", body)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.content
    return [item["id"] for item in response.json()["items"]]


# --- the list and one item ----------------------------------------------------------------------


def test_an_escalated_step_is_listed_with_its_full_context(operator_client, escalated):
    wait = escalated()
    response = operator_client.get(ESCALATIONS)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["next_cursor"] is None
    (item,) = body["items"]
    assert item["id"] == wait.pk and item["run_id"] == wait.run_id
    assert item["workflow"] == "escalating"
    assert item["step_id"] == wait.step_id
    assert (item["step"], item["node"], item["agent"]) == ("act", "act", "test_fails_until")
    assert item["status"] == "open" and item["why"] == "retries exhausted"
    assert "gave up after 2 attempts" in item["reason"]
    assert item["actions"] == ["retry", "skip", "abort"]
    assert item["decision"] == "" and item["decided_by"] is None and item["decided_at"] is None
    assert item["decision_reason"] == "" and item["output"] is None
    assert item["created_at"].endswith("Z") and item["deadline_at"].endswith("Z")

    context = item["context"]
    assert context["error"]["code"] == "max_attempts" and context["error"]["class"] == "limit"
    assert [a["attempt"] for a in context["attempts"]] == [1, 2]
    assert {a["code"] for a in context["attempts"]} == {"unavailable"}
    assert {a["agent"] for a in context["attempts"]} == {"test_fails_until"}
    assert context["agents_tried"] == ["test_fails_until"]
    assert context["fallback"] is None and context["compensation"] is False
    assert context["input"]["fail_attempts"] == 2
    assert context["skip_contract"] == "Text"
    assert "text" in context["skip_schema"]["properties"]
    assert context["tool_calls"] == []


def test_one_escalation_by_id(operator_client, escalated):
    wait = escalated()
    response = operator_client.get(f"{ESCALATIONS}/{wait.pk}")
    assert response.status_code == 200, response.content
    item = response.json()
    assert item["id"] == wait.pk and item["step"] == "act" and item["status"] == "open"
    assert item["context"]["why"] == "retries exhausted"
    assert item == operator_client.get(ESCALATIONS).json()["items"][0]


def test_a_permanent_failure_escalates_at_once(operator_client, escalated):
    wait = escalated(permanent=True)
    item = operator_client.get(f"{ESCALATIONS}/{wait.pk}").json()
    assert item["why"] == "permanent error"
    assert item["context"]["error"]["code"] == "refused"
    assert len(item["context"]["attempts"]) == 1


def test_a_failed_compensation_escalates_too(operator_client, escalated, effect_provider):
    wait = escalated(workflow="saga", permanent=True, undo_failures=5)
    item = operator_client.get(f"{ESCALATIONS}/{wait.pk}").json()
    assert item["workflow"] == "saga"
    assert (item["step"], item["node"], item["agent"]) == (
        "undo:reserve",
        "undo:reserve",
        "test_effect_undo",
    )
    assert item["context"]["compensation"] is True and item["context"]["kind"] == "compensate"
    assert Run.objects.get(pk=wait.run_id).status == "compensating"


def test_unknown_ids_and_approvals_are_not_escalations(
    operator_client, escalated, pending_approval
):
    wait = escalated()
    approval = pending_approval()
    for missing in (MISSING, approval.pk):
        assert_error(operator_client.get(f"{ESCALATIONS}/{missing}"), 404, "escalation_not_found")
    assert ids(operator_client.get(ESCALATIONS, {"status": "all"})) == [wait.pk]


@pytest.mark.parametrize("bad_id", ["abc", "0", "-1", str(2**63)])
def test_ids_that_are_not_positive_bigints_are_422(operator_client, escalated, row_counts, bad_id):
    escalated()
    before = row_counts()
    assert_error(operator_client.get(f"{ESCALATIONS}/{bad_id}"), 422, "invalid_request")
    response = post_json(operator_client, f"{ESCALATIONS}/{bad_id}/resolve", {"action": "retry"})
    assert_error(response, 422, "invalid_request")
    assert row_counts() == before


# --- approvals stay approvals ------------------------------------------------------------------


def test_escalations_are_not_approvals(operator_client, escalated, row_counts):
    wait = escalated()
    assert operator_client.get("/api/v1/approvals").json() == []
    before = row_counts()
    response = post_json(
        operator_client, f"/api/v1/approvals/{wait.pk}/decide", {"decision": "approve"}
    )
    assert_error(response, 404, "approval_not_found")
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_an_approval_id_cannot_be_resolved_as_an_escalation(
    operator_client, pending_approval, row_counts
):
    approval = pending_approval()
    before = row_counts()
    assert_error(resolve(operator_client, approval.pk, action="retry"), 404, "escalation_not_found")
    assert row_counts() == before
    assert Wait.objects.get(pk=approval.pk).status == "open"


# --- who sees and who resolves ------------------------------------------------------------------


def test_a_stranger_sees_no_escalations_of_others(stranger, client_for, escalated, row_counts):
    wait = escalated()
    client = client_for(stranger)
    assert ids(client.get(ESCALATIONS, {"status": "all"})) == []
    assert_error(client.get(f"{ESCALATIONS}/{wait.pk}"), 404, "escalation_not_found")
    before = row_counts()
    assert_error(resolve(client, wait.pk, action="retry"), 404, "escalation_not_found")
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_a_submitter_sees_only_their_own_escalations_and_may_not_resolve(
    submitter, client_for, escalated, row_counts
):
    theirs = escalated()
    mine = escalated(user=submitter)
    client = client_for(submitter)
    assert ids(client.get(ESCALATIONS)) == [mine.pk]
    assert_error(client.get(f"{ESCALATIONS}/{theirs.pk}"), 404, "escalation_not_found")
    before = row_counts()
    assert_error(resolve(client, mine.pk, action="retry"), 403, "decide_denied")
    assert row_counts() == before


def test_a_viewer_sees_every_escalation_but_may_not_resolve(
    viewer, client_for, escalated, row_counts
):
    wait = escalated()
    client = client_for(viewer)
    assert ids(client.get(ESCALATIONS)) == [wait.pk]
    assert client.get(f"{ESCALATIONS}/{wait.pk}").status_code == 200
    before = row_counts()
    for body in (
        {"action": "retry"},
        {"action": "abort", "reason": "stop"},
        {"action": "skip", "reason": "r", "output": {"text": "x"}},
    ):
        assert_error(resolve(client, wait.pk, **body), 403, "decide_denied")
    assert row_counts() == before
    wait.refresh_from_db()
    assert wait.status == "open" and wait.decision == ""


# --- pagination and filters ---------------------------------------------------------------------


def test_the_list_is_newest_first_and_pages_with_a_cursor(operator_client, escalated):
    waits = [escalated() for _ in range(3)]
    first = operator_client.get(ESCALATIONS, {"limit": 2}).json()
    assert [item["id"] for item in first["items"]] == [waits[2].pk, waits[1].pk]
    assert first["next_cursor"]
    second = operator_client.get(ESCALATIONS, {"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [item["id"] for item in second["items"]] == [waits[0].pk]
    assert second["next_cursor"] is None
    # a page is stable while new escalations arrive
    escalated()
    again = operator_client.get(ESCALATIONS, {"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [item["id"] for item in again["items"]] == [waits[0].pk]


def test_status_filters(operator_client, operator, escalated, settings):
    resolved = escalated()
    escalation_resolve(wait_id=resolved.pk, user=operator, action="retry")
    expired = escalated()
    Wait.objects.filter(pk=expired.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert expire_waits() == 1
    cancelled = escalated()
    run_cancel(run_id=cancelled.run_id, user=operator, reason="not needed")
    still_open = escalated()

    def listed(**params: str) -> list[int]:
        return ids(operator_client.get(ESCALATIONS, params))

    assert listed() == [still_open.pk]
    assert listed(status="open") == [still_open.pk]
    assert listed(status="resolved") == [resolved.pk]
    assert listed(status="expired") == [expired.pk]
    assert listed(status="cancelled") == [cancelled.pk]
    assert listed(status="all") == [still_open.pk, cancelled.pk, expired.pk, resolved.pk]

    items = {
        item["id"]: item
        for item in operator_client.get(ESCALATIONS, {"status": "all"}).json()["items"]
    }
    assert items[still_open.pk]["actions"] == ["retry", "skip", "abort"]
    for closed in (resolved, expired, cancelled):
        assert items[closed.pk]["actions"] == []
    assert items[resolved.pk]["decision"] == "retry"
    assert items[resolved.pk]["decided_by"] == "operator"
    assert Run.objects.get(pk=expired.run_id).error_code == "escalation_expired"


def test_the_workflow_filter(operator_client, escalated, effect_provider):
    plain = escalated()
    saga = escalated(workflow="saga", permanent=True, undo_failures=5)
    assert ids(operator_client.get(ESCALATIONS, {"workflow": "escalating"})) == [plain.pk]
    assert ids(operator_client.get(ESCALATIONS, {"workflow": "saga"})) == [saga.pk]
    assert ids(operator_client.get(ESCALATIONS, {"workflow": "nothing_like_it"})) == []
    assert ids(operator_client.get(ESCALATIONS)) == [saga.pk, plain.pk]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": 0}, "invalid_request"),
        ({"limit": 201}, "invalid_request"),
        ({"limit": "ten"}, "invalid_request"),
        ({"status": "bogus"}, "invalid_request"),
        ({"status": "approved"}, "invalid_request"),
        ({"workflow": "w" * 101}, "invalid_request"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"cursor": "0"}, "invalid_cursor"),
        ({"cursor": "-5"}, "invalid_cursor"),
        ({"cursor": "9" * 40}, "invalid_cursor"),
        ({"cursor": "c" * 101}, "invalid_request"),
    ],
)
def test_bad_list_parameters_are_422(operator_client, params, code):
    assert_error(operator_client.get(ESCALATIONS, params), 422, code)


# --- answers ------------------------------------------------------------------------------------


def test_retry_runs_the_step_again_and_the_run_completes(operator_client, escalated, drive):
    wait = escalated()
    response = resolve(operator_client, wait.pk, action="retry", reason="the service is back")
    assert response.status_code == 200, response.content
    item = response.json()
    assert item["status"] == "resolved" and item["decision"] == "retry"
    assert item["decided_by"] == "operator" and item["decided_at"].endswith("Z")
    assert item["decision_reason"] == "the service is back"
    assert item["actions"] == []
    assert AuditEvent.objects.filter(run_id=wait.run_id, verb=Verb.ESCALATION_RETRIED).count() == 1

    run = drive(wait.run_id)
    assert run.status == "succeeded", (run.error_code, run.error_message)
    act = Step.objects.get(pk=wait.step_id)
    assert act.status == "succeeded" and act.attempt == 3
    assert act.output == {"text": "ok:echo:hi on attempt 3"}
    assert run.degraded == [] and "_degraded" not in run.output
    assert ids(operator_client.get(ESCALATIONS)) == []


def test_skip_with_a_valid_value_continues_the_run_degraded(operator_client, escalated, drive):
    wait = escalated()
    response = resolve(
        operator_client,
        wait.pk,
        action="skip",
        reason="answered by phone",
        output={"text": "supplied by hand"},
    )
    assert response.status_code == 200, response.content
    item = response.json()
    assert item["status"] == "resolved" and item["decision"] == "skip"
    assert item["output"] == {"text": "supplied by hand"}

    run = drive(wait.run_id)
    assert run.status == "succeeded", (run.error_code, run.error_message)
    act = Step.objects.get(pk=wait.step_id)
    assert act.status == "succeeded" and act.output == {"text": "supplied by hand"}
    assert act.degraded.startswith("skipped by operator")
    (entry,) = run.degraded
    assert entry["step"] == "act" and "answered by phone" in entry["reason"]
    assert run.output["_degraded"] == run.degraded
    finish = Step.objects.get(run_id=wait.run_id, node="finish")
    assert finish.input == {"text": "supplied by hand"}
    assert run.state["final"] == "echo:supplied by hand"

    detail = operator_client.get(f"/api/v1/runs/{wait.run_id}").json()
    assert detail["degraded"] == run.degraded
    (act_out,) = [s for s in detail["steps"] if s["id"] == act.pk]
    assert act_out["degraded"] == act.degraded
    assert len(act_out["attempts"]) == 2


def test_skip_with_an_invalid_value_is_422_and_changes_nothing(
    operator_client, escalated, row_counts
):
    wait = escalated()
    before = row_counts()
    response = resolve(
        operator_client, wait.pk, action="skip", reason="try", output={"text": {"not": "text"}}
    )
    error = assert_error(response, 422, "output_contract")
    assert error["detail"][0]["loc"] == ["text"]
    assert "act" in error["message"]
    assert row_counts() == before
    wait.refresh_from_db()
    assert wait.status == "open" and wait.decision == "" and wait.payload is None
    step = Step.objects.get(pk=wait.step_id)
    assert step.status == "waiting" and step.output is None and step.degraded == ""
    assert Run.objects.get(pk=wait.run_id).degraded == []


def test_abort_fails_the_run(operator_client, escalated, drive):
    wait = escalated()
    response = resolve(operator_client, wait.pk, action="abort", reason="customer withdrew")
    assert response.status_code == 200, response.content
    assert response.json()["decision"] == "abort"
    run = drive(wait.run_id)
    assert run.status == "failed" and run.error_code == "aborted"
    assert "customer withdrew" in run.error_message
    assert Step.objects.get(pk=wait.step_id).status == "failed"
    assert not Step.objects.filter(run=run, node="finish").exists()


def test_aborting_a_failed_compensation_stops_the_rest(
    operator_client, escalated, drive, effect_provider
):
    wait = escalated(workflow="saga", permanent=True, undo_failures=5)
    response = resolve(operator_client, wait.pk, action="abort", reason="undo by hand")
    assert response.status_code == 200, response.content
    run = drive(wait.run_id)
    assert run.status == "failed"
    assert "compensation stopped" in run.error_message


def test_a_second_answer_gets_409_already_decided(operator_client, escalated, row_counts):
    wait = escalated()
    assert resolve(operator_client, wait.pk, action="retry").status_code == 200
    before = row_counts()
    response = resolve(operator_client, wait.pk, action="abort", reason="too late")
    error = assert_error(response, 409, "already_decided")
    assert error["detail"]["status"] == "resolved"
    assert error["detail"]["decision"] == "retry"
    assert error["detail"]["decided_by"] == "operator"
    assert "already resolved" in error["message"] and "retry by operator" in error["message"]
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).decision == "retry"


def test_an_escalation_of_a_cancelled_run_cannot_be_resolved(
    operator_client, operator, escalated, row_counts
):
    wait = escalated()
    run_cancel(run_id=wait.run_id, user=operator)
    before = row_counts()
    error = assert_error(resolve(operator_client, wait.pk, action="retry"), 409, "already_decided")
    assert error["detail"]["status"] == "cancelled"
    assert row_counts() == before


def test_resolving_an_unknown_escalation_is_404(operator_client, escalated, row_counts):
    escalated()
    before = row_counts()
    assert_error(resolve(operator_client, MISSING, action="retry"), 404, "escalation_not_found")
    assert row_counts() == before


# --- bad requests -------------------------------------------------------------------------------


def unchanged(wait: Wait) -> None:
    wait.refresh_from_db()
    assert wait.status == "open" and wait.decision == ""
    assert Step.objects.get(pk=wait.step_id).status == "waiting"


@pytest.mark.parametrize(
    ("body", "code", "loc"),
    [
        ({}, "invalid_request", "action"),
        ({"action": "maybe"}, "invalid_request", "action"),
        ({"action": 1}, "invalid_request", "action"),
        ({"action": "retry", "reason": 5}, "invalid_request", "reason"),
        ({"action": "retry", "reason": "r" * 2001}, "invalid_request", "reason"),
        ({"action": "skip", "reason": "r", "output": "text"}, "invalid_request", "output"),
        ({"action": "skip", "reason": "r", "output": [1]}, "invalid_request", "output"),
        ({"action": "skip", "output": {"text": "x"}}, "reason_required", "reason"),
        ({"action": "skip", "reason": "  ", "output": {"text": "x"}}, "reason_required", "reason"),
        ({"action": "skip", "reason": "no value"}, "output_missing", "output"),
        ({"action": "abort"}, "reason_required", "reason"),
        ({"action": "retry", "output": {"text": "x"}}, "output_unexpected", "output"),
        (
            {"action": "abort", "reason": "r", "output": {"text": "x"}},
            "output_unexpected",
            "output",
        ),
        ({"action": "skip"}, "invalid_request", "reason"),
    ],
    ids=[
        "empty",
        "unknown-action",
        "action-not-a-string",
        "reason-not-a-string",
        "reason-too-long",
        "output-a-string",
        "output-a-list",
        "skip-no-reason",
        "skip-blank-reason",
        "skip-no-output",
        "abort-no-reason",
        "retry-with-output",
        "abort-with-output",
        "skip-no-reason-no-output",
    ],
)
def test_a_malformed_answer_is_422_and_changes_nothing(
    operator_client, escalated, row_counts, body, code, loc
):
    wait = escalated()
    before = row_counts()
    error = assert_error(resolve(operator_client, wait.pk, **body), 422, code)
    assert any(loc in detail["loc"] for detail in error["detail"]), error["detail"]
    assert loc in error["message"]
    assert row_counts() == before
    unchanged(wait)


@pytest.mark.parametrize("body", ['{"action": ', "{not json}", "\x00\xff", "nan-garbage"])
def test_malformed_json_is_400_and_changes_nothing(operator_client, escalated, row_counts, body):
    wait = escalated()
    before = row_counts()
    response = post_json(operator_client, f"{ESCALATIONS}/{wait.pk}/resolve", body)
    assert_error(response, 400, "malformed_json")
    assert row_counts() == before
    unchanged(wait)


@pytest.mark.parametrize("body", ["[1, 2]", '"retry"', "42", "null"])
def test_a_json_body_that_is_not_an_object_is_422(operator_client, escalated, row_counts, body):
    wait = escalated()
    before = row_counts()
    response = post_json(operator_client, f"{ESCALATIONS}/{wait.pk}/resolve", body)
    assert_error(response, 422, "invalid_request")
    assert row_counts() == before
    unchanged(wait)


def test_a_body_over_the_upload_limit_is_413_and_changes_nothing(
    operator_client, escalated, row_counts, settings
):
    wait = escalated()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    before = row_counts()
    body = {"action": "skip", "reason": "big", "output": {"text": "x" * 20_000}}
    error = assert_error(resolve(operator_client, wait.pk, **body), 413, "payload_too_large")
    assert error["detail"] == {"limit": 10_000}
    assert row_counts() == before
    unchanged(wait)


def test_a_skip_value_over_max_payload_bytes_is_413_and_changes_nothing(
    operator_client, escalated, row_counts, settings
):
    wait = escalated()
    settings.SIGNALBOX = {**settings.SIGNALBOX, "MAX_PAYLOAD_BYTES": 1_000}
    before = row_counts()
    body = {"action": "skip", "reason": "big", "output": {"text": "x" * 2_000}}
    assert_error(resolve(operator_client, wait.pk, **body), 413, "payload_too_large")
    assert row_counts() == before
    unchanged(wait)


def test_requests_without_credentials_are_401_and_change_nothing(client, escalated, row_counts):
    wait = escalated()
    for path in (ESCALATIONS, f"{ESCALATIONS}/{wait.pk}"):
        response = client.get(path)
        assert_error(response, 401, "unauthenticated")
        assert response["WWW-Authenticate"].startswith("Bearer")
    before = row_counts()
    assert_error(resolve(client, wait.pk, action="retry"), 401, "unauthenticated")
    assert_error(
        resolve(Client(HTTP_AUTHORIZATION="Bearer sbx_not-a-token"), wait.pk, action="retry"),
        401,
        "unauthenticated",
    )
    assert row_counts() == before
    unchanged(wait)


def test_a_wrong_method_is_405_json(operator_client, escalated):
    wait = escalated()
    response = operator_client.get(f"{ESCALATIONS}/{wait.pk}/resolve")
    error = assert_error(response, 405, "method_not_allowed")
    assert "POST" in response["Allow"] and "POST" in error["message"]


def test_the_endpoints_are_documented(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    assert set(paths[ESCALATIONS]) == {"get"}
    assert set(paths[ESCALATIONS + "/{escalation_id}"]) == {"get"}
    resolve_op = paths[ESCALATIONS + "/{escalation_id}/resolve"]["post"]
    assert {"200", "401", "403", "404", "409", "413", "422"} <= set(resolve_op["responses"])
