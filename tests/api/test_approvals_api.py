"""Approvals through the REST API: the pending list and every kind of decision."""

from __future__ import annotations

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Step, Wait
from orchestration.services import approvals_decide_bulk, run_submit
from tests.policies.documents import BOTH_BRANCHES_NEED_APPROVAL

pytestmark = pytest.mark.django_db

APPROVALS = "/api/v1/approvals"


def decide(client, approval_id: int, **body):
    return client.post(f"{APPROVALS}/{approval_id}/decide", body, content_type="application/json")


def test_pending_approvals_list_the_proposed_action(operator_client, pending_approval):
    wait = pending_approval()
    response = operator_client.get(APPROVALS)
    assert response.status_code == 200, response.content
    (item,) = response.json()
    assert item["id"] == wait.pk
    assert item["run_id"] == wait.run_id
    assert item["workflow"] == "reference_workload"
    assert (item["node"], item["agent"], item["tier"]) == ("publish", "noop", 1)
    assert item["reason"] == "benchmark approval"
    assert item["status"] == "open" and item["decision"] == "" and item["decided_by"] is None
    assert item["action"]["input"] == {"topic": "bench", "needs_approval": True}
    assert item["deadline_at"].endswith("Z") and item["created_at"].endswith("Z")


def test_approvals_on_runs_a_user_cannot_see_are_not_listed(stranger, client_for, pending_approval):
    pending_approval()
    response = client_for(stranger).get(APPROVALS)
    assert response.status_code == 200
    assert response.json() == []


def test_decided_approvals_leave_the_pending_list(operator_client, pending_approval):
    wait = pending_approval()
    assert decide(operator_client, wait.pk, decision="approve").status_code == 200
    assert operator_client.get(APPROVALS).json() == []


def test_approve_resumes_the_run(operator_client, pending_approval, drive):
    wait = pending_approval()
    response = decide(operator_client, wait.pk, decision="approve", reason="looks right")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["decision"] == "approve"
    assert body["decided_by"] == "operator" and body["decided_at"].endswith("Z")
    assert body["decision_reason"] == "looks right"
    assert AuditEvent.objects.filter(run_id=wait.run_id, verb=Verb.APPROVAL_APPROVED).count() == 1
    drive(wait.run_id)
    assert Run.objects.get(pk=wait.run_id).status == "succeeded"


def test_a_decision_costs_a_bounded_number_of_queries(
    operator_client, pending_approval, django_assert_max_num_queries
):
    first, wait = pending_approval(), pending_approval()
    # The token's first use records last_used_at (one UPDATE); the first decision on this
    # connection prepares the statement that closes an approval (once per connection).
    assert decide(operator_client, first.pk, decision="approve").status_code == 200
    # token with user and permissions; the approval with its run and step; in the service: the
    # run locked, the approval closed and its step read (one statement), then the step, run and
    # audit writes (one pipeline), inside a savepoint here; none to show the result (16 queries
    # before, then 11, then 8)
    with django_assert_max_num_queries(6):
        response = decide(operator_client, wait.pk, decision="approve", reason="ok")
    body = response.json()
    assert response.status_code == 200, body
    assert (body["workflow"], body["node"]) == ("reference_workload", "publish")
    assert body["decided_by"] == "operator"
    assert body["status"] == "approved"


def test_reject_with_a_reason_stops_the_step(operator_client, pending_approval, drive):
    wait = pending_approval()
    response = decide(operator_client, wait.pk, decision="reject", reason="wrong customer")
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "rejected"
    assert response.json()["decision_reason"] == "wrong customer"
    step = Step.objects.get(pk=wait.step_id)
    assert step.status == "failed" and step.error_code == "approval_rejected"
    drive(wait.run_id)
    assert Run.objects.get(pk=wait.run_id).status == "failed"


def test_edit_with_a_valid_input_runs_the_edited_action(operator_client, pending_approval, drive):
    wait = pending_approval("parallel_approvals", {"text": "draft"})
    response = decide(
        operator_client,
        wait.pk,
        decision="edit",
        reason="fix the wording",
        edited_input={"text": "final"},
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["decision"] == "edit"
    assert body["edited_input"] == {"text": "final"}
    drive(wait.run_id)
    step = Step.objects.get(pk=wait.step_id)
    assert step.status == "succeeded"
    assert step.output == {"text": "echo:final"}
    detail = operator_client.get(f"/api/v1/runs/{wait.run_id}").json()
    edited = next(s for s in detail["steps"] if s["id"] == step.pk)
    assert edited["input"] == {"text": "final"}


def test_edit_with_an_invalid_input_is_refused_and_changes_nothing(
    operator_client, pending_approval, row_counts
):
    wait = pending_approval("parallel_approvals", {"text": "draft"})
    before = row_counts()
    response = decide(
        operator_client,
        wait.pk,
        decision="edit",
        reason="try",
        edited_input={"text": {"not": "a string"}},
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "input_contract"
    assert error["detail"][0]["loc"] == ["text"]
    assert row_counts() == before
    wait.refresh_from_db()
    assert wait.status == "open" and wait.edited_input is None
    assert Step.objects.get(pk=wait.step_id).input_override is None


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"decision": "reject"}, "reason_required", "reason"),
        ({"decision": "reject", "reason": "   "}, "reason_required", "reason"),
        ({"decision": "edit", "edited_input": {"text": "x"}}, "reason_required", "reason"),
        ({"decision": "edit", "reason": "no input given"}, "edited_input_missing", "edited_input"),
        (
            {"decision": "approve", "edited_input": {"text": "x"}},
            "edited_input_unexpected",
            "edited_input",
        ),
        ({"decision": "maybe", "reason": "?"}, "invalid_request", "decision"),
        ({}, "invalid_request", "decision"),
    ],
    ids=[
        "reject-no-reason",
        "reject-blank-reason",
        "edit-no-reason",
        "edit-no-input",
        "approve-with-input",
        "unknown",
        "empty",
    ],
)
def test_a_malformed_decision_is_refused_and_changes_nothing(
    operator_client, pending_approval, row_counts, body, code, field
):
    wait = pending_approval()
    before = row_counts()
    response = decide(operator_client, wait.pk, **body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == code
    assert field in error["message"]
    assert [d["loc"] for d in error["detail"]] == [["body", field]]
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_a_second_decision_gets_409_already_decided(operator_client, pending_approval, row_counts):
    wait = pending_approval()
    assert decide(operator_client, wait.pk, decision="approve").status_code == 200
    before = row_counts()
    response = decide(operator_client, wait.pk, decision="reject", reason="too late")
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "already_decided"
    assert error["detail"]["status"] == "approved"
    assert "operator" in error["message"]
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).decision == "approve"


def test_a_viewer_may_not_decide(viewer, client_for, pending_approval, row_counts):
    wait = pending_approval()
    before = row_counts()
    response = decide(client_for(viewer), wait.pk, decision="approve")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "decide_denied"
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_an_approval_on_a_hidden_run_is_not_found(
    stranger, client_for, pending_approval, row_counts
):
    wait = pending_approval()
    before = row_counts()
    response = decide(client_for(stranger), wait.pk, decision="approve")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "approval_not_found"
    assert row_counts() == before


# --- several at once ------------------------------------------------------------------------------


def decide_bulk(client, **body):
    return client.post(f"{APPROVALS}/decide", body, content_type="application/json")


def test_bulk_approval_decides_each_and_says_what_happened_to_each(
    operator_client, pending_approval, drive
):
    first, second, decided = pending_approval(), pending_approval(), pending_approval()
    assert decide(operator_client, decided.pk, decision="approve").status_code == 200
    response = decide_bulk(
        operator_client,
        ids=[second.pk, decided.pk, first.pk, 999_999],
        decision="approve",
        reason="batch of the morning",
    )
    assert response.status_code == 200, response.content
    outcomes = {o["id"]: (o["ok"], o["code"]) for o in response.json()}
    assert [o["id"] for o in response.json()] == [second.pk, decided.pk, first.pk, 999_999]
    assert outcomes == {
        first.pk: (True, ""),
        second.pk: (True, ""),
        decided.pk: (False, "already_decided"),
        999_999: (False, "approval_not_found"),
    }
    for wait in (first, second):
        row = Wait.objects.get(pk=wait.pk)
        assert (row.status, row.decision_reason, row.decided_by.username) == (
            "approved",
            "batch of the morning",
            "operator",
        )
        drive(wait.run_id)
        assert Run.objects.get(pk=wait.run_id).status == "succeeded"


def test_bulk_approval_does_not_reach_runs_a_user_cannot_see(
    stranger, client_for, pending_approval, row_counts
):
    wait = pending_approval()
    before = row_counts()
    response = decide_bulk(client_for(stranger), ids=[wait.pk], decision="approve")
    assert response.status_code == 200
    assert response.json() == [
        {
            "id": wait.pk,
            "ok": False,
            "code": "approval_not_found",
            "message": f"no approval {wait.pk}",
        }
    ]
    assert row_counts() == before


def test_bulk_rejection_needs_a_reason_and_bulk_edits_are_refused(
    operator_client, pending_approval
):
    wait = pending_approval()
    response = decide_bulk(operator_client, ids=[wait.pk], decision="reject", reason=" ")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "reason_required"
    response = decide_bulk(operator_client, ids=[wait.pk], decision="edit", reason="x")
    assert response.status_code == 422
    response = decide_bulk(operator_client, ids=[], decision="approve")
    assert response.status_code == 422
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_bulk_approval_costs_a_bounded_number_of_queries_per_approval(
    operator_client, pending_approval, django_assert_max_num_queries
):
    first, *waits = [pending_approval() for _ in range(4)]
    # The token's first use records last_used_at (one UPDATE); the first decision on this
    # connection prepares the statement that closes an approval (once per connection).
    assert decide_bulk(operator_client, ids=[first.pk], decision="approve").status_code == 200
    # token; the approvals with their runs and steps; then in one transaction (a savepoint
    # here, 2 queries): for each, its run locked, the approval closed and its step read (one
    # statement); then every approval's writes in one pipeline (2 + 6 per approval before)
    with django_assert_max_num_queries(5 + len(waits)):
        response = decide_bulk(operator_client, ids=[w.pk for w in waits], decision="approve")
    assert [o["ok"] for o in response.json()] == [True] * len(waits)


@pytest.mark.parametrize(
    ("ids", "why"),
    [
        ([], "at least 1"),
        ([1, 1], "more than once"),
        (list(range(1, 102)), "at most 100"),
        ([0], "greater than or equal to 1"),
        (["first"], "valid integer"),
        ([2**63], "less than or equal to"),
    ],
    ids=["empty", "duplicates", "too-many", "zero", "not-an-id", "out-of-range"],
)
def test_a_malformed_bulk_decision_is_refused_and_changes_nothing(
    operator_client, pending_approval, row_counts, ids, why
):
    wait = pending_approval()
    ids = [wait.pk if i == 1 else i for i in ids]
    before = row_counts()
    response = decide_bulk(operator_client, ids=ids, decision="approve", reason="x")
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "ids" in error["message"] and why in error["message"], error["message"]
    assert row_counts() == before
    assert Wait.objects.get(pk=wait.pk).status == "open"


def test_bulk_approval_of_unknown_approvals_reports_each_and_changes_nothing(
    operator_client, row_counts
):
    before = row_counts()
    response = decide_bulk(operator_client, ids=[999_998, 999_999], decision="approve")
    assert response.status_code == 200, response.content
    assert [(o["id"], o["ok"], o["code"]) for o in response.json()] == [
        (999_998, False, "approval_not_found"),
        (999_999, False, "approval_not_found"),
    ]
    assert row_counts() == before


def test_a_refused_approval_is_reported_and_the_others_in_the_call_are_decided(
    operator, pending_approval, drive
):
    first, second = pending_approval(), pending_approval()
    # The operator submitted this run: someone else must approve it.
    mine = run_submit(
        workflow="reference_workload", input={"needs_approval": True}, submitted_by=operator
    ).run
    drive(mine.pk)
    own = Wait.objects.get(run=mine, status="open")
    outcomes = approvals_decide_bulk(
        wait_ids=[first.pk, own.pk, second.pk], user=operator, reason="mixed"
    )
    assert [(o.wait_id, o.ok, o.code) for o in outcomes] == [
        (first.pk, True, ""),
        (own.pk, False, "self_approval"),
        (second.pk, True, ""),
    ]
    assert Wait.objects.get(pk=own.pk).status == "open"
    assert {Wait.objects.get(pk=w.pk).status for w in (first, second)} == {"approved"}


@pytest.fixture
def twin_approvals(requester, drive):
    """A run with two open approvals at once (its two parallel branches)."""
    from policies.active import active_forget
    from policies.services import policy_install

    policy_install(source=BOTH_BRANCHES_NEED_APPROVAL, note="tests")
    active_forget()

    def make() -> list[Wait]:
        run = run_submit(workflow="reference_workload", input={}, submitted_by=requester).run
        drive(run.pk)
        waits = list(Wait.objects.filter(run=run, kind="approval", status="open").order_by("pk"))
        assert [w.step.node for w in waits] == ["research_a", "research_b"]
        return waits

    return make


def test_bulk_approval_of_two_approvals_of_one_run_decides_both(
    operator_client, twin_approvals, drive
):
    left, right = twin_approvals()
    other, _ = twin_approvals()
    response = decide_bulk(
        operator_client, ids=[right.pk, other.pk, left.pk], decision="approve", reason="both"
    )
    assert response.status_code == 200, response.content
    assert [(o["id"], o["ok"]) for o in response.json()] == [
        (right.pk, True),
        (other.pk, True),
        (left.pk, True),
    ]
    run = Run.objects.get(pk=left.run_id)
    assert (run.status, run.waiting_steps) == ("running", 0)
    assert {
        s.node: s.status for s in Step.objects.filter(run=run, node__startswith="research")
    } == {
        "research_a": "queued",
        "research_b": "queued",
    }
    assert AuditEvent.objects.filter(run_id=run.pk, verb=Verb.APPROVAL_APPROVED).count() == 2
    assert drive(run.pk).status == "succeeded"
    assert Run.objects.get(pk=other.run_id).waiting_steps == 1  # its other approval is open


def test_bulk_rejection_of_two_approvals_of_one_run_reports_the_second_as_closed_by_the_first(
    operator_client, twin_approvals
):
    left, right = twin_approvals()
    response = decide_bulk(
        operator_client, ids=[left.pk, right.pk], decision="reject", reason="wrong topic"
    )
    assert response.status_code == 200, response.content
    first, second = response.json()
    assert (first["id"], first["ok"]) == (left.pk, True)
    # Rejecting the first failed the run, which cancelled the other approval.
    assert (second["id"], second["ok"], second["code"]) == (right.pk, False, "already_decided")
    assert "cancelled" in second["message"]
    assert Run.objects.get(pk=left.run_id).status == "failed"
    assert [Wait.objects.get(pk=w.pk).status for w in (left, right)] == ["rejected", "cancelled"]
