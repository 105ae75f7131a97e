"""Runs through the REST API: submit, read, list, cancel, send events; workflows; health."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from console.models import ApiToken
from orchestration.models import Run, RunEvent, Step, Wait
from orchestration.services import run_cancel, run_submit
from tests.factories import TenantFactory

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/runs"


def submit(client: Client, **body):
    body.setdefault("workflow", "reference_workload")
    body.setdefault("input", {"topic": "api"})
    return client.post(RUNS, body, content_type="application/json")


# --- submit -------------------------------------------------------------------------------------


def test_submit_starts_a_run_and_answers_201(operator_client, operator):
    TenantFactory(slug="acme")
    response = submit(operator_client, priority=5, tenant="acme")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["created"] is True
    assert body["workflow"] == "reference_workload"
    assert body["workflow_version"] == 1
    assert body["status"] == "queued"
    assert body["priority"] == 5
    assert body["tenant"] == "acme"
    assert body["error"] is None
    assert body["created_at"].endswith("Z")
    run = Run.objects.get(pk=body["id"])
    assert run.submitted_by == operator
    assert run.input == {"topic": "api"}
    assert Step.objects.filter(run=run, node="classify", status="queued").exists()


def test_submit_with_a_seen_idempotency_key_returns_the_first_run_with_200(operator_client):
    first = submit(operator_client, idempotency_key="order-42")
    again = submit(operator_client, idempotency_key="order-42")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"]
    assert Run.objects.filter(idempotency_key="order-42").count() == 1


def test_a_seen_idempotency_key_with_a_different_request_is_409_and_starts_nothing(operator_client):
    first = submit(operator_client, idempotency_key="order-43")
    again = submit(operator_client, idempotency_key="order-43", input={"topic": "different"})
    assert first.status_code == 201
    assert again.status_code == 409, again.content
    error = again.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert str(first.json()["id"]) in error["message"]
    assert Run.objects.filter(idempotency_key="order-43").count() == 1


def test_idempotency_key_is_also_read_from_the_header(operator_client):
    first = operator_client.post(
        RUNS,
        {"workflow": "reference_workload", "input": {}},
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="hdr-1",
    )
    again = operator_client.post(
        RUNS,
        {"workflow": "reference_workload", "input": {}, "idempotency_key": "hdr-1"},
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY="hdr-1",
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["idempotency_key"] == "hdr-1"
    assert again.json()["id"] == first.json()["id"]
    assert Run.objects.count() == 1


def test_idempotency_keys_are_scoped_to_the_submitter(operator_client, submitter, client_for):
    mine = submit(operator_client, idempotency_key="shared")
    theirs = submit(client_for(submitter), idempotency_key="shared")
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert mine.json()["id"] != theirs.json()["id"]


def test_submit_an_explicit_version(operator_client):
    response = submit(operator_client, version=1)
    assert response.status_code == 201
    assert response.json()["workflow_version"] == 1


# --- read ---------------------------------------------------------------------------------------


def test_run_detail_has_steps_state_history_waits_and_events(operator_client, pending_approval):
    wait = pending_approval()
    response = operator_client.get(f"{RUNS}/{wait.run_id}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"] == wait.run_id
    assert body["status"] == "waiting"
    assert body["submitted_by"] == "requester"
    assert body["input"] == {"needs_approval": True}
    assert body["state"] == {"topic": "bench", "needs_approval": True}
    assert {(v["key"], v["version"], v["writer"]) for v in body["state_versions"]} == {
        ("topic", 1, "submit"),
        ("needs_approval", 1, "submit"),
    }
    steps = {s["key"]: s for s in body["steps"]}
    assert set(steps) == {"classify", "research_a", "research_b", "draft", "publish"}
    classify = steps["classify"]
    assert classify["status"] == "succeeded"
    assert classify["kind"] == "agent" and classify["agent"] == "noop"
    assert classify["attempt"] == 1 and classify["failures"] == 0
    # The engine stores an agent step's input only for map items and operator edits.
    assert "input" in classify
    assert len(classify["output"]["payload"]) == 200
    assert classify["error"] is None
    assert classify["finished_at"].endswith("Z")
    assert steps["publish"]["status"] == "waiting"
    (approval,) = body["waits"]
    assert approval["id"] == wait.pk
    assert approval["kind"] == "approval" and approval["status"] == "open"
    assert approval["action"]["input"] == {"topic": "bench", "needs_approval": True}
    assert body["events"] == []


def test_run_detail_renders_a_step_error_with_its_class_and_code(operator_client, operator, drive):
    run = run_submit(workflow="bad_handoff", input={}, submitted_by=operator).run
    drive(run.pk)
    body = operator_client.get(f"{RUNS}/{run.pk}").json()
    assert body["status"] == "failed"
    assert body["error"]["code"]
    failed = [s for s in body["steps"] if s["status"] == "failed"]
    assert failed
    error = failed[0]["error"]
    assert set(error) == {"class", "code", "message", "detail"}
    assert error["class"] == "contract"
    assert error["code"] and error["message"]


def test_a_submitter_sees_their_own_run_but_not_another_users(operator, submitter, client_for):
    mine = run_submit(workflow="reference_workload", input={}, submitted_by=submitter).run
    other = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run
    client = client_for(submitter)
    assert client.get(f"{RUNS}/{mine.pk}").status_code == 200
    hidden = client.get(f"{RUNS}/{other.pk}")
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "run_not_found"
    assert [r["id"] for r in client.get(RUNS).json()["items"]] == [mine.pk]


# --- list ---------------------------------------------------------------------------------------


def test_list_pages_through_every_run_newest_first_with_a_cursor(operator_client, operator):
    ids = [
        run_submit(workflow="reference_workload", input={}, submitted_by=operator).run.pk
        for _ in range(5)
    ]
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = operator_client.get(RUNS, params)
        assert response.status_code == 200, response.content
        page = response.json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == sorted(ids, reverse=True)


def test_list_filters_by_status_workflow_and_creation_time(operator_client, operator):
    old = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run
    Run.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=2))
    cancelled = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run
    run_cancel(run_id=cancelled.pk, user=operator)
    research = run_submit(workflow="research_brief", input={}, submitted_by=operator).run

    def ids(**params) -> set[int]:
        response = operator_client.get(RUNS, params)
        assert response.status_code == 200, response.content
        return {item["id"] for item in response.json()["items"]}

    assert ids(status="cancelled") == {cancelled.pk}
    assert ids(status=["cancelled", "queued"]) == {old.pk, cancelled.pk, research.pk}
    assert ids(workflow="research_brief") == {research.pk}
    yesterday = (timezone.now() - timedelta(days=1)).isoformat()
    assert ids(created_after=yesterday) == {cancelled.pk, research.pk}
    assert ids(created_before=yesterday) == {old.pk}
    assert ids(created_before=yesterday, workflow="research_brief") == set()


def test_list_filters_by_what_a_run_waits_for(operator_client, operator, drive):
    on_event = drive(
        run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run.pk
    )
    queued = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run

    def ids(**params) -> set[int]:
        response = operator_client.get(RUNS, params)
        assert response.status_code == 200, response.content
        return {item["id"] for item in response.json()["items"]}

    assert on_event.status == "waiting"
    assert ids(waiting_for="event") == {on_event.pk}
    assert ids(waiting_for="approval") == set()
    assert ids() == {on_event.pk, queued.pk}
    response = operator_client.get(RUNS, {"waiting_for": "lunch"})
    assert response.status_code == 422
    assert "waiting_for" in response.content.decode()


def test_list_answers_an_empty_page_for_a_user_who_sees_nothing(stranger, operator, client_for):
    run_submit(workflow="reference_workload", input={}, submitted_by=operator)
    body = client_for(stranger).get(RUNS).json()
    assert body == {"items": [], "next_cursor": None}


def test_list_query_count_does_not_grow_with_the_page(
    operator_client, operator, django_assert_max_num_queries
):
    for _ in range(3):
        run_submit(workflow="reference_workload", input={}, submitted_by=operator)
    operator_client.get(RUNS)  # the token's first use records last_used_at (one UPDATE)
    # the token with its user and model permissions (direct and through groups), the page
    with django_assert_max_num_queries(2):
        small = operator_client.get(RUNS, {"limit": 1})
    for _ in range(20):
        run_submit(workflow="reference_workload", input={}, submitted_by=operator)
    with django_assert_max_num_queries(2):
        big = operator_client.get(RUNS, {"limit": 200})
    assert len(small.json()["items"]) == 1 and len(big.json()["items"]) == 23


def test_detail_query_count_does_not_grow_with_the_run(
    operator_client, pending_approval, django_assert_max_num_queries
):
    wait = pending_approval()
    operator_client.get(f"{RUNS}/{wait.run_id}")
    # token with user and permissions, run, submitter, state history, steps, waits, events
    with django_assert_max_num_queries(7):
        response = operator_client.get(f"{RUNS}/{wait.run_id}")
    assert len(response.json()["steps"]) == 5


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_stops_the_run_and_a_second_cancel_conflicts(operator_client, operator):
    run = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run
    response = operator_client.post(
        f"{RUNS}/{run.pk}/cancel", {"reason": "no longer needed"}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"]
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert run.error_message == "no longer needed"
    assert not Step.objects.filter(
        run=run, status__in=["queued", "running", "pending", "waiting"]
    ).exists()
    again = operator_client.post(f"{RUNS}/{run.pk}/cancel", content_type="application/json")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_terminal"


def test_cancel_without_a_body_is_accepted(operator_client, operator):
    run = run_submit(workflow="reference_workload", input={}, submitted_by=operator).run
    response = operator_client.post(f"{RUNS}/{run.pk}/cancel", content_type="application/json")
    assert response.status_code == 200, response.content


# --- events -------------------------------------------------------------------------------------


def test_an_event_sent_twice_is_applied_once(operator_client, operator, drive):
    run = run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run
    drive(run.pk)
    assert Wait.objects.filter(run=run, kind="event", status="open").exists()
    event = {"name": "payment.settled", "event_id": "evt-1", "payload": {"ok": 1}}
    url = f"{RUNS}/{run.pk}/events"
    first = operator_client.post(url, event, content_type="application/json")
    again = operator_client.post(url, event, content_type="application/json")
    assert first.status_code == 202, first.content
    assert first.json() == {"applied": True, "duplicate": False, "event_id": "evt-1"}
    assert again.status_code == 202
    assert again.json() == {"applied": False, "duplicate": True, "event_id": "evt-1"}
    assert RunEvent.objects.filter(run=run).count() == 1
    drive(run.pk)
    run.refresh_from_db()
    assert run.status == "succeeded"
    assert run.state["settlement"] == {"ok": 1}


def test_an_event_id_sent_again_with_another_payload_is_409(operator_client, operator):
    run = run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run
    url = f"{RUNS}/{run.pk}/events"
    first = operator_client.post(
        url,
        {"name": "payment.settled", "event_id": "evt-2", "payload": {"ok": 1}},
        content_type="application/json",
    )
    again = operator_client.post(
        url,
        {"name": "payment.settled", "event_id": "evt-2", "payload": {"ok": 2}},
        content_type="application/json",
    )
    assert first.status_code == 202, first.content
    assert again.status_code == 409, again.content
    assert again.json()["error"]["code"] == "event_id_reused"
    assert list(RunEvent.objects.filter(run=run).values_list("payload", flat=True)) == [{"ok": 1}]


def test_an_event_before_its_wait_is_kept_not_applied(operator_client, operator):
    run = run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run
    response = operator_client.post(
        f"{RUNS}/{run.pk}/events",
        {"name": "payment.settled", "event_id": "early"},
        content_type="application/json",
    )
    assert response.status_code == 202
    assert response.json() == {"applied": False, "duplicate": False, "event_id": "early"}
    assert RunEvent.objects.filter(run=run, event_id="early", applied_at__isnull=True).exists()


# --- workflows and health -----------------------------------------------------------------------


def test_workflows_list_the_latest_version_of_each(operator_client):
    response = operator_client.get("/api/v1/workflows")
    assert response.status_code == 200
    names = [wf["name"] for wf in response.json()]
    assert names == sorted(set(names))
    assert {"content_pipeline", "refund_desk", "research_brief", "reference_workload"} <= set(names)


def test_workflow_detail_describes_its_graph(stranger, client_for):
    response = client_for(stranger).get("/api/v1/workflows/reference_workload")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "reference_workload" and body["version"] == 1 and body["versions"] == [1]
    assert body["start"] == ["classify"]
    assert [n["name"] for n in body["nodes"]] == [
        "classify",
        "research_a",
        "research_b",
        "draft",
        "publish",
    ]
    assert "needs_approval" in body["input_schema"]["properties"]


def test_health_needs_no_authentication(client):
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --- authentication -----------------------------------------------------------------------------


def test_a_token_records_its_use_at_most_once_a_minute(operator, django_assert_num_queries):
    token, raw = ApiToken.issue(operator, "cli")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    client.get("/api/v1/workflows")
    token.refresh_from_db()
    first_use = token.last_used_at
    assert first_use is not None
    with django_assert_num_queries(1):  # the token lookup; no UPDATE within the minute
        client.get("/api/v1/workflows")
    token.refresh_from_db()
    assert token.last_used_at == first_use


def test_a_revoked_token_is_refused(operator):
    token, raw = ApiToken.issue(operator, "old")
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    response = Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get(RUNS)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_revoked"  # a code of its own: make a new one


def test_a_session_works_and_its_writes_need_the_csrf_token(operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    assert client.get(RUNS).status_code == 200
    refused = client.post(
        RUNS, {"workflow": "reference_workload", "input": {}}, content_type="application/json"
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    assert Run.objects.count() == 0
    client.get("/api/docs")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    accepted = client.post(
        RUNS,
        {"workflow": "reference_workload", "input": {}},
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert accepted.status_code == 201, accepted.content


def test_token_clients_get_permissions_from_their_groups_too_and_a_change_counts_at_once(
    stranger, client_for
):
    from django.contrib.auth.models import Group, Permission

    client = client_for(stranger)
    body = {"workflow": "reference_workload", "input": {}}
    assert client.post(RUNS, body, content_type="application/json").status_code == 403
    submit = [
        Permission.objects.get(codename="add_run"),
        Permission.objects.get(codename="submit_runs"),
    ]
    group = Group.objects.create(name="submitters")
    group.permissions.add(*submit)
    stranger.groups.add(group)
    assert client.post(RUNS, body, content_type="application/json").status_code == 201
    stranger.groups.remove(group)
    assert client.post(RUNS, body, content_type="application/json").status_code == 403
    stranger.user_permissions.add(*submit)
    assert client.post(RUNS, body, content_type="application/json").status_code == 201
