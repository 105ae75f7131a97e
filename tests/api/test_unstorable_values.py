"""Values PostgreSQL cannot store (a NUL character, a lone surrogate, NaN or Infinity, a
time-zone offset beyond ±15:59) are refused by the API with 422 ``unstorable_value`` and the
field named — never a 500 from the database — and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from orchestration.models import Wait

pytestmark = pytest.mark.django_db

NUL = "a\u0000b"
SURROGATE = "a\ud800b"
NESTED_NUL = {"topic": "ok", "deep": [{"list": ["fine", NUL]}]}


def post_json(client: Client, path: str, body: Any, **extra: Any) -> Any:
    # json.dumps writes NaN and Infinity as the bare words (as some clients do) and escapes
    # NUL and lone surrogates as \u0000 and \ud800: each arrives as the value it stands for.
    return client.post(path, json.dumps(body), content_type="application/json", **extra)


def assert_unstorable(response: Any, *loc: str) -> dict[str, Any]:
    assert response.status_code == 422, response.content
    error = response.json()["error"]
    assert error["code"] == "unstorable_value", error
    where = ".".join(loc)
    assert where in error["message"], error["message"]
    assert [detail["loc"] for detail in error["detail"]] == [list(loc)]
    assert detail_types(error) == {"unstorable_value"}
    return error


def detail_types(error: dict[str, Any]) -> set[str]:
    return {detail["type"] for detail in error["detail"]}


@pytest.fixture
def target(pending_approval: Callable[..., Wait], escalated: Callable[..., Wait]) -> dict[str, int]:
    """An open approval (its run waiting) and an open escalation: something for every URL."""
    approval = pending_approval()
    escalation = escalated()
    return {"run": approval.run_id, "approval": approval.pk, "escalation": escalation.pk}


# --- a run's submit ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "loc", "says"),
    [
        ({"input": {"topic": NUL}}, ("body", "input"), "at topic: "),
        ({"input": NESTED_NUL}, ("body", "input"), "at deep[0].list[1]: "),
        ({"input": {NUL: "value"}}, ("body", "input"), "a key contains a NUL"),
        ({"input": {"topic": SURROGATE}}, ("body", "input"), "lone surrogate"),
        ({"input": {"topic": "t", "score": float("nan")}}, ("body", "input"), "nan"),
        ({"input": {"topic": "t", "score": float("inf")}}, ("body", "input"), "inf"),
        ({"input": {"topic": "t", "score": [float("-inf")]}}, ("body", "input"), "-inf"),
        ({"tenant": NUL}, ("body", "tenant"), "NUL"),
        ({"tenant": SURROGATE}, ("body", "tenant"), "lone surrogate"),
        ({"idempotency_key": NUL}, ("body", "idempotency_key"), "NUL"),
        ({"workflow": "reference\u0000workload"}, ("body", "workflow"), "NUL"),
    ],
    ids=[
        "input-nul",
        "input-nested-nul",
        "input-key-nul",
        "input-surrogate",
        "input-nan",
        "input-infinity",
        "input-minus-infinity",
        "tenant-nul",
        "tenant-surrogate",
        "idempotency-key-nul",
        "workflow-nul",
    ],
)
def test_a_submit_with_an_unstorable_value_is_422_and_writes_nothing(
    operator_client: Client, row_counts: Callable[[], dict[str, int]], body, loc, says
) -> None:
    before = row_counts()
    response = post_json(
        operator_client, "/api/v1/runs", {"workflow": "reference_workload", **body}
    )
    error = assert_unstorable(response, *loc)
    assert says in error["message"]
    assert row_counts() == before


def test_nan_written_as_a_bare_word_is_refused_like_any_other(
    operator_client: Client, row_counts: Callable[[], dict[str, int]]
) -> None:
    before = row_counts()
    raw = '{"workflow": "reference_workload", "input": {"score": NaN, "big": 1e999}}'
    response = operator_client.post("/api/v1/runs", raw, content_type="application/json")
    assert_unstorable(response, "body", "input")
    assert row_counts() == before


def test_an_idempotency_key_header_with_a_nul_is_422_and_writes_nothing(
    operator_client: Client, row_counts: Callable[[], dict[str, int]]
) -> None:
    before = row_counts()
    response = post_json(
        operator_client,
        "/api/v1/runs",
        {"workflow": "reference_workload"},
        HTTP_IDEMPOTENCY_KEY=NUL,
    )
    assert_unstorable(response, "header", "Idempotency-Key")
    assert row_counts() == before


def test_input_nested_deeper_than_the_limit_is_422_and_writes_nothing(
    operator_client: Client, row_counts: Callable[[], dict[str, int]]
) -> None:
    deep: Any = "bottom"
    for _ in range(101):
        deep = [deep]
    before = row_counts()
    response = post_json(
        operator_client, "/api/v1/runs", {"workflow": "reference_workload", "input": {"x": deep}}
    )
    error = assert_unstorable(response, "body", "input")
    assert "nested more than 100 levels" in error["message"]
    assert row_counts() == before


# --- writes to a run, its approval and its escalation ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/api/v1/runs/{run}/cancel", {"reason": NUL}, ("body", "reason")),
        ("/api/v1/runs/{run}/cancel", {"reason": SURROGATE}, ("body", "reason")),
        ("/api/v1/runs/{run}/events", {"name": NUL, "event_id": "e-1"}, ("body", "name")),
        ("/api/v1/runs/{run}/events", {"name": "n", "event_id": NUL}, ("body", "event_id")),
        (
            "/api/v1/runs/{run}/events",
            {"name": "n", "event_id": "e-1", "payload": {"note": NUL}},
            ("body", "payload"),
        ),
        (
            "/api/v1/runs/{run}/events",
            {"name": "n", "event_id": "e-1", "payload": {"amount": float("nan")}},
            ("body", "payload"),
        ),
        (
            "/api/v1/runs/{run}/events",
            {"name": "n", "event_id": "e-1", "payload": {"note": SURROGATE}},
            ("body", "payload"),
        ),
        (
            "/api/v1/approvals/{approval}/decide",
            {"decision": "reject", "reason": NUL},
            ("body", "reason"),
        ),
        (
            "/api/v1/approvals/{approval}/decide",
            {"decision": "edit", "reason": "fix", "edited_input": {"topic": NUL}},
            ("body", "edited_input"),
        ),
        (
            "/api/v1/approvals/{approval}/decide",
            {"decision": "edit", "reason": "fix", "edited_input": {"n": float("inf")}},
            ("body", "edited_input"),
        ),
        (
            "/api/v1/escalations/{escalation}/resolve",
            {"action": "abort", "reason": NUL},
            ("body", "reason"),
        ),
        (
            "/api/v1/escalations/{escalation}/resolve",
            {"action": "skip", "reason": "by hand", "output": {"text": NUL}},
            ("body", "output"),
        ),
        (
            "/api/v1/escalations/{escalation}/resolve",
            {"action": "skip", "reason": "by hand", "output": {"text": "t", "n": float("nan")}},
            ("body", "output"),
        ),
    ],
    ids=[
        "cancel-reason-nul",
        "cancel-reason-surrogate",
        "event-name-nul",
        "event-id-nul",
        "event-payload-nul",
        "event-payload-nan",
        "event-payload-surrogate",
        "decision-reason-nul",
        "edited-input-nul",
        "edited-input-infinity",
        "escalation-reason-nul",
        "skip-output-nul",
        "skip-output-nan",
    ],
)
def test_a_write_with_an_unstorable_value_is_422_and_writes_nothing(
    operator_client: Client,
    target: dict[str, int],
    row_counts: Callable[[], dict[str, int]],
    path: str,
    body: dict[str, Any],
    loc: tuple[str, ...],
) -> None:
    before = row_counts()
    assert_unstorable(post_json(operator_client, path.format(**target), body), *loc)
    assert row_counts() == before
    assert Wait.objects.get(pk=target["approval"]).status == "open"
    assert Wait.objects.get(pk=target["escalation"]).status == "open"


# --- list filters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "loc"),
    [
        ("/api/v1/runs", {"workflow": NUL}, ("query", "workflow")),
        ("/api/v1/escalations", {"workflow": NUL}, ("query", "workflow")),
        (
            "/api/v1/runs",
            {"created_after": "2025-01-01T00:00:00+16:00"},
            ("query", "created_after"),
        ),
        (
            "/api/v1/runs",
            {"created_after": "2025-01-01T00:00:00+23:59"},
            ("query", "created_after"),
        ),
        (
            "/api/v1/runs",
            {"created_before": "2025-01-01T00:00:00-16:00"},
            ("query", "created_before"),
        ),
        # Valid offsets, but the instant falls outside Python's years 1-9999 in UTC.
        (
            "/api/v1/runs",
            {"created_after": "0001-01-01T00:00:00+14:00"},
            ("query", "created_after"),
        ),
        (
            "/api/v1/runs",
            {"created_before": "9999-12-31T23:59:59-10:00"},
            ("query", "created_before"),
        ),
    ],
    ids=[
        "runs-workflow-nul",
        "escalations-workflow-nul",
        "offset-plus-16",
        "offset-plus-23-59",
        "offset-minus-16",
        "before-year-1-in-utc",
        "after-year-9999-in-utc",
    ],
)
def test_a_list_filter_the_database_cannot_compare_is_422(
    operator_client: Client, path: str, params: dict[str, str], loc: tuple[str, ...]
) -> None:
    assert_unstorable(operator_client.get(path, params), *loc)


@pytest.mark.parametrize("offset", ["+15:59", "-15:59", "+00:00", "Z"])
def test_offsets_within_15_59_are_accepted(operator_client: Client, offset: str) -> None:
    response = operator_client.get(
        "/api/v1/runs", {"created_after": f"2025-01-01T00:00:00{offset}"}
    )
    assert response.status_code == 200, response.content
