"""Bad requests to every endpoint: each gets a 4xx JSON error with a stable code, and nothing
in the database changes."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from orchestration.services import run_cancel, run_submit

pytestmark = pytest.mark.django_db

MISSING = 987_654_321

VALID_BODIES = {
    "/api/v1/runs": {"workflow": "reference_workload", "input": {}},
    "/api/v1/runs/{run}/cancel": {"reason": "stop"},
    "/api/v1/runs/{run}/events": {"name": "payment.settled", "event_id": "e-1", "payload": {}},
    "/api/v1/approvals/{approval}/decide": {"decision": "approve"},
}
POSTS = list(VALID_BODIES)
GETS = [
    "/api/v1/runs",
    "/api/v1/runs/{run}",
    "/api/v1/approvals",
    "/api/v1/workflows",
    "/api/v1/workflows/reference_workload",
]


@pytest.fixture
def target(pending_approval):
    """A run waiting on an approval, owned by the operator: something for every URL to name."""
    wait = pending_approval()
    return {"run": wait.run_id, "approval": wait.pk}


def url(template: str, target: dict[str, int]) -> str:
    return template.format(**target)


def post_json(client: Client, path: str, body, **extra):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(path, data, content_type="application/json", **extra)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize("template", GETS)
def test_a_read_without_credentials_is_401(client, target, template):
    response = client.get(url(template, target))
    assert_error(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("template", POSTS)
def test_a_write_without_credentials_is_401_and_changes_nothing(
    client, target, row_counts, template
):
    before = row_counts()
    assert_error(
        post_json(client, url(template, target), VALID_BODIES[template]), 401, "unauthenticated"
    )
    assert row_counts() == before


@pytest.mark.parametrize(
    "header", ["Bearer sbx_not-a-token", "Bearer ", "Basic dXNlcjpwYXNz", "sbx_no_scheme"]
)
def test_a_bad_authorization_header_is_401(target, header):
    client = Client(HTTP_AUTHORIZATION=header)
    assert_error(client.get("/api/v1/runs"), 401, "unauthenticated")


def test_a_token_of_a_deactivated_user_is_401(operator, client_for):
    client = client_for(operator)
    operator.is_active = False
    operator.save(update_fields=["is_active"])
    assert_error(client.get("/api/v1/runs"), 401, "unauthenticated")


# --- permissions --------------------------------------------------------------------------------


def test_a_user_without_add_run_may_not_submit(stranger, client_for, row_counts):
    before = row_counts()
    response = post_json(client_for(stranger), "/api/v1/runs", VALID_BODIES["/api/v1/runs"])
    assert_error(response, 403, "submit_denied")
    assert row_counts() == before


@pytest.mark.parametrize("template", ["/api/v1/runs/{run}/cancel", "/api/v1/runs/{run}/events"])
def test_a_viewer_may_see_but_not_change_a_run(viewer, client_for, target, row_counts, template):
    client = client_for(viewer)
    assert client.get(url("/api/v1/runs/{run}", target)).status_code == 200
    before = row_counts()
    assert_error(
        post_json(client, url(template, target), VALID_BODIES[template]), 403, "decide_denied"
    )
    assert row_counts() == before


@pytest.mark.parametrize("template", ["/api/v1/runs/{run}", *POSTS[1:3]])
def test_someone_elses_run_is_404_for_a_user_without_permissions(
    stranger, client_for, target, row_counts, template
):
    client = client_for(stranger)
    before = row_counts()
    path = url(template, target)
    response = (
        client.get(path) if template in GETS else post_json(client, path, VALID_BODIES[template])
    )
    assert_error(response, 404, "run_not_found")
    assert row_counts() == before


# --- unknown ids, paths and methods -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("get", f"/api/v1/runs/{MISSING}", "run_not_found"),
        ("post", f"/api/v1/runs/{MISSING}/cancel", "run_not_found"),
        ("post", f"/api/v1/runs/{MISSING}/events", "run_not_found"),
        ("post", f"/api/v1/approvals/{MISSING}/decide", "approval_not_found"),
        ("get", "/api/v1/workflows/no_such_workflow", "unknown_workflow"),
        ("get", "/api/v1/workflows/reference_workload?version=99", "unknown_workflow"),
        ("get", "/api/v1/no/such/endpoint", "not_found"),
        ("get", "/api/nothing-here", "not_found"),
    ],
)
def test_unknown_objects_and_paths_are_404(operator_client, target, row_counts, method, path, code):
    before = row_counts()
    if method == "get":
        response = operator_client.get(path)
    else:
        body = next(b for t, b in VALID_BODIES.items() if path.endswith(t.rsplit("}", 1)[-1]))
        response = post_json(operator_client, path, body)
    assert_error(response, 404, code)
    assert row_counts() == before


def test_an_approval_id_that_names_an_event_wait_is_404(
    operator_client, operator, drive, row_counts
):
    run = run_submit(workflow="event_timeout_continue", input={}, submitted_by=operator).run
    drive(run.pk)
    event_wait = run.waits.get(kind="event")
    before = row_counts()
    response = post_json(
        operator_client, f"/api/v1/approvals/{event_wait.pk}/decide", {"decision": "approve"}
    )
    assert_error(response, 404, "approval_not_found")
    assert row_counts() == before


@pytest.mark.parametrize("bad_id", ["abc", "0", "-1", "1.5", str(2**63), "99999999999999999999999"])
def test_ids_that_are_not_positive_bigints_are_422(operator_client, target, row_counts, bad_id):
    before = row_counts()
    assert_error(operator_client.get(f"/api/v1/runs/{bad_id}"), 422, "invalid_request")
    for path in (f"/api/v1/runs/{bad_id}/cancel", f"/api/v1/approvals/{bad_id}/decide"):
        assert_error(
            post_json(operator_client, path, {"decision": "approve"}), 422, "invalid_request"
        )
    assert row_counts() == before


def test_a_wrong_method_is_405_json(operator_client, target):
    response = operator_client.put(url("/api/v1/runs/{run}", target))
    error = assert_error(response, 405, "method_not_allowed")
    assert "GET" in response["Allow"] and "GET" in error["message"]


# --- malformed and oversized bodies -------------------------------------------------------------


@pytest.mark.parametrize("template", POSTS)
@pytest.mark.parametrize("body", ['{"workflow": ', "{not json}", "\x00\xff", "nan-garbage"])
def test_malformed_json_is_400_and_changes_nothing(
    operator_client, target, row_counts, template, body
):
    before = row_counts()
    assert_error(post_json(operator_client, url(template, target), body), 400, "malformed_json")
    assert row_counts() == before


@pytest.mark.parametrize("template", POSTS)
@pytest.mark.parametrize("body", ["[1, 2]", '"a string"', "42", "null"])
def test_a_json_body_that_is_not_an_object_is_422(
    operator_client, target, row_counts, template, body
):
    before = row_counts()
    response = post_json(operator_client, url(template, target), body)
    if template.endswith("/cancel") and body == "null":
        assert response.status_code == 200  # cancel's body is optional; null means none
        return
    assert_error(response, 422, "invalid_request")
    assert row_counts() == before


@pytest.mark.parametrize("template", POSTS)
def test_a_body_over_the_upload_limit_is_413_and_changes_nothing(
    operator_client, target, row_counts, settings, template
):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    body = {**VALID_BODIES[template], "padding": "x" * 20_000}
    before = row_counts()
    error = assert_error(
        post_json(operator_client, url(template, target), body), 413, "payload_too_large"
    )
    assert error["detail"] == {"limit": 10_000}
    assert row_counts() == before


def test_a_body_over_the_upload_limit_is_413_for_an_anonymous_session_too(
    client, settings, row_counts
):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    before = row_counts()
    response = client.post(
        "/api/v1/runs", {"padding": "x" * 5_000}
    )  # form-encoded, read by the CSRF check
    assert response.status_code in (401, 413)
    assert response["Content-Type"].startswith("application/json")
    assert row_counts() == before


@pytest.fixture
def small_payloads(settings):
    settings.SIGNALBOX = {**settings.SIGNALBOX, "MAX_PAYLOAD_BYTES": 1_000}


def test_a_run_input_over_max_payload_bytes_is_refused(operator_client, small_payloads, row_counts):
    before = row_counts()
    body = {"workflow": "reference_workload", "input": {"topic": "x" * 2_000}}
    assert_error(post_json(operator_client, "/api/v1/runs", body), 413, "payload_too_large")
    assert row_counts() == before


def test_an_event_payload_over_max_payload_bytes_is_refused(
    operator_client, target, small_payloads, row_counts
):
    before = row_counts()
    body = {"name": "payment.settled", "event_id": "big", "payload": {"blob": "x" * 2_000}}
    assert_error(
        post_json(operator_client, url("/api/v1/runs/{run}/events", target), body),
        413,
        "payload_too_large",
    )
    assert row_counts() == before


def test_an_edited_input_over_max_payload_bytes_is_refused(
    operator_client, pending_approval, row_counts, settings
):
    wait = pending_approval("parallel_approvals", {"text": "draft"})
    settings.SIGNALBOX = {**settings.SIGNALBOX, "MAX_PAYLOAD_BYTES": 1_000}
    before = row_counts()
    body = {"decision": "edit", "reason": "longer", "edited_input": {"text": "x" * 2_000}}
    assert_error(
        post_json(operator_client, f"/api/v1/approvals/{wait.pk}/decide", body),
        413,
        "payload_too_large",
    )
    assert row_counts() == before


# --- wrong types and values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "body", "loc"),
    [
        ("/api/v1/runs", {"input": {}}, "workflow"),
        ("/api/v1/runs", {"workflow": 5, "input": {}}, "workflow"),
        ("/api/v1/runs", {"workflow": "", "input": {}}, "workflow"),
        ("/api/v1/runs", {"workflow": "reference_workload", "input": "topic"}, "input"),
        ("/api/v1/runs", {"workflow": "reference_workload", "input": [1]}, "input"),
        ("/api/v1/runs", {"workflow": "reference_workload", "priority": "high"}, "priority"),
        ("/api/v1/runs", {"workflow": "reference_workload", "priority": 10**6}, "priority"),
        ("/api/v1/runs", {"workflow": "reference_workload", "priority": True}, "priority"),
        ("/api/v1/runs", {"workflow": "reference_workload", "version": True}, "version"),
        ("/api/v1/runs", {"workflow": "reference_workload", "version": 0}, "version"),
        ("/api/v1/runs", {"workflow": "reference_workload", "version": "latest"}, "version"),
        (
            "/api/v1/runs",
            {"workflow": "reference_workload", "idempotency_key": ""},
            "idempotency_key",
        ),
        (
            "/api/v1/runs",
            {"workflow": "reference_workload", "idempotency_key": "k" * 201},
            "idempotency_key",
        ),
        ("/api/v1/runs", {"workflow": "reference_workload", "tenant": ["a"]}, "tenant"),
        ("/api/v1/runs/{run}/cancel", {"reason": 5}, "reason"),
        ("/api/v1/runs/{run}/events", {"name": "payment.settled"}, "event_id"),
        ("/api/v1/runs/{run}/events", {"name": "", "event_id": "e"}, "name"),
        ("/api/v1/runs/{run}/events", {"name": "n", "event_id": "e", "payload": [1]}, "payload"),
        ("/api/v1/runs/{run}/events", {"name": "n", "event_id": "e" * 201}, "event_id"),
        ("/api/v1/approvals/{approval}/decide", {"decision": 1}, "decision"),
        (
            "/api/v1/approvals/{approval}/decide",
            {"decision": "edit", "reason": "r", "edited_input": "x"},
            "edited_input",
        ),
    ],
)
def test_wrong_types_are_422_with_the_field_named(
    operator_client, target, row_counts, template, body, loc
):
    before = row_counts()
    error = assert_error(
        post_json(operator_client, url(template, target), body), 422, "invalid_request"
    )
    assert any(loc in detail["loc"] for detail in error["detail"]), error["detail"]
    assert row_counts() == before


def test_an_input_that_breaks_the_workflows_contract_is_422(operator_client, row_counts):
    before = row_counts()
    body = {"workflow": "refund_desk", "input": {"channel": "fax", "order_id": ""}}
    error = assert_error(post_json(operator_client, "/api/v1/runs", body), 422, "input_contract")
    assert {tuple(d["loc"]) for d in error["detail"]} == {("channel",), ("order_id",)}
    assert row_counts() == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"workflow": "no_such_workflow", "input": {}}, "unknown_workflow"),
        ({"workflow": "reference_workload", "version": 99, "input": {}}, "unknown_workflow"),
    ],
)
def test_submitting_an_unknown_workflow_is_404(operator_client, row_counts, body, code):
    before = row_counts()
    assert_error(post_json(operator_client, "/api/v1/runs", body), 404, code)
    assert row_counts() == before


def test_differing_idempotency_keys_in_header_and_body_are_422(operator_client, row_counts):
    before = row_counts()
    body = {"workflow": "reference_workload", "idempotency_key": "body-key"}
    response = post_json(operator_client, "/api/v1/runs", body, HTTP_IDEMPOTENCY_KEY="header-key")
    assert_error(response, 422, "idempotency_key_mismatch")
    assert row_counts() == before


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": 0}, "invalid_request"),
        ({"limit": 201}, "invalid_request"),
        ({"limit": "ten"}, "invalid_request"),
        ({"status": "bogus"}, "invalid_request"),
        ({"status": ["queued", "bogus"]}, "invalid_request"),
        ({"created_after": "2025-01-01T00:00:00"}, "invalid_request"),
        ({"created_before": "yesterday"}, "invalid_request"),
        ({"workflow": "w" * 101}, "invalid_request"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"cursor": "2025-01-01T00:00:00+00:00_abc"}, "invalid_cursor"),
        ({"cursor": "c" * 101}, "invalid_request"),
    ],
)
def test_bad_list_parameters_are_422(operator_client, params, code):
    assert_error(operator_client.get("/api/v1/runs", params), 422, code)


def test_a_cursor_with_an_out_of_range_id_is_not_a_server_error(operator_client, target):
    response = operator_client.get(
        "/api/v1/runs", {"cursor": "2025-01-01T00:00:00+00:00_99999999999999999999"}
    )
    assert response.status_code in (200, 422), response.content


# --- state conflicts ----------------------------------------------------------------------------


def test_an_event_to_a_finished_run_is_409(operator_client, operator, target, row_counts):
    run_cancel(run_id=target["run"], user=operator)
    before = row_counts()
    body = {"name": "payment.settled", "event_id": "late", "payload": {}}
    assert_error(
        post_json(operator_client, url("/api/v1/runs/{run}/events", target), body),
        409,
        "run_terminal",
    )
    assert row_counts() == before


def test_deciding_an_approval_of_a_cancelled_run_is_409(
    operator_client, operator, target, row_counts
):
    run_cancel(run_id=target["run"], user=operator)
    before = row_counts()
    response = post_json(
        operator_client, url("/api/v1/approvals/{approval}/decide", target), {"decision": "approve"}
    )
    assert_error(response, 409, "already_decided")
    assert row_counts() == before


# --- refused before the API's view ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["'>fT{n", "evil.example"])
def test_a_host_that_is_not_allowed_is_a_json_400_under_the_api(operator_client, host):
    assert_error(operator_client.get("/api/v1/runs", HTTP_HOST=host), 400, "bad_request")
    assert_error(
        post_json(operator_client, "/api/v1/runs", VALID_BODIES["/api/v1/runs"], HTTP_HOST=host),
        400,
        "bad_request",
    )


def test_a_host_that_is_not_allowed_is_django_s_page_outside_the_api(client):
    response = client.get("/accounts/login/", HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
