"""The spend API: ceilings with percentages, a run's reservations, raising a run's ceiling;
who may see and do what, and clear 4xx for bad input."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from guardian.shortcuts import assign_perm

from console.models import ApiToken
from orchestration.ledger_calls import block_call_value
from orchestration.models import Step
from orchestration.services import run_submit
from policies.ledger import ceiling_release, ceiling_reserve
from policies.limits import CeilingScope
from policies.models import SpendScope, Tenant
from tests.factories import TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

#: What deciding for any run takes, apart from the tier (the tenant's and the workflow's).
DECIDER = [
    "orchestration.view_run",
    "orchestration.decide_run",
    "orchestration.decide_workflow",
    "policies.decide_runs",
]


def _client(user: Any) -> Client:
    _, raw = ApiToken.issue(user, "tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.fixture
def spend() -> int:
    """A run of tenant acme with two reservations (8 of its 10 set aside); returns its id."""
    TenantFactory(slug="acme")
    TenantFactory(slug="other")
    run = run_submit(workflow="reference_workload", input={}, tenant="acme").run
    for tenant in ("acme", "other"):
        ceiling_reserve(
            scopes=[
                CeilingScope("run", str(run.pk), Decimal("10"), Decimal("0.8")),
                CeilingScope("tenant_month", tenant, Decimal("40"), Decimal("0.8")),
            ],
            amount=Decimal("4"),
            run_id=run.pk,
            step_id=1,
            action="agent:x",
            owner="w",
            ttl=timedelta(minutes=5),
        )
    return run.pk


def test_an_operator_sees_every_scope_with_percentages(spend: int, operator: Any) -> None:
    body = _client(operator).get("/api/v1/spend/ceilings").json()
    run = next(s for s in body if s["kind"] == "run")
    assert (run["reserved"], run["committed_percent"], run["soft_percent"]) == (
        "8.000000",
        80.0,
        80.0,
    )
    assert sorted(s["key"] for s in body if s["kind"] == "tenant_month") == ["acme", "other"]


def test_a_tenant_viewer_sees_only_their_tenants_month(spend: int) -> None:
    viewer = UserFactory(username="acme-viewer")
    assign_perm("policies.view_runs", viewer, Tenant.objects.get(slug="acme"))
    body = _client(viewer).get("/api/v1/spend/ceilings").json()
    assert [(s["kind"], s["key"]) for s in body] == [("tenant_month", "acme")]
    assert _client(viewer).get(f"/api/v1/spend/runs/{spend}/reservations").status_code == 403


def test_a_runs_reservations_show_a_block_and_the_calls_made_from_it(
    spend: int, operator: Any
) -> None:
    from django.utils import timezone

    from policies.blocks import Block
    from policies.ledger import settlement_apply

    block = Block(
        ceiling_reserve(
            scopes=[CeilingScope("run", str(spend), Decimal("10"), Decimal("0.8"))],
            amount=Decimal("2"),
            run_id=spend,
            step_id=2,
            action="agent:x",
            owner="w",
            ttl=timedelta(minutes=5),
            kind="block",
        )
    )
    assert block.take(Decimal("1"), timezone.now(), timedelta(seconds=30))
    settlement_apply(
        block.spend(step_id=3, action="agent:x", worst=Decimal(1), actual=Decimal("0.4"))
    )
    # A second call, made by an attempt that succeeded: recorded on its step row by the
    # completion (``orchestration.ledger_calls``), listed all the same.
    step = Step.objects.filter(run_id=spend).first()
    assert step is not None
    assert block.take(Decimal("1"), timezone.now(), timedelta(seconds=30))
    call = block.spend(step_id=step.pk, action="agent:x", worst=Decimal(1), actual=Decimal("0.3"))
    Step.objects.filter(pk=step.pk).update(
        block_call=block_call_value(call), finished_at=timezone.now()
    )
    rows = _client(operator).get(f"/api/v1/spend/runs/{spend}/reservations").json()
    assert [
        (r["kind"], r["amount"], r["actual"], r["status"], r["block_id"], r["recorded_on"])
        for r in rows
    ] == [
        ("call", "4.000000", None, "held", None, "ledger"),
        ("call", "4.000000", None, "held", None, "ledger"),
        ("block", "2.000000", None, "held", None, "ledger"),
        ("call", "1.000000", "0.400000", "settled", block.reservation.pk, "ledger"),
        ("call", "1.000000", "0.300000", "settled", block.reservation.pk, "step"),
    ]
    assert (rows[-1]["id"], rows[-1]["step_id"], rows[-1]["expires_at"]) == (None, step.pk, None)
    # Released (its worker died), the block charges both calls, wherever they were recorded.
    released = ceiling_release(block.reservation.pk)
    assert (released.status, released.actual) == ("released", Decimal("0.7"))
    assert SpendScope.objects.get(kind="run", key=str(spend)).spent == Decimal("0.7")


def test_reservations_of_a_run_and_raising_its_ceiling(spend: int, operator: Any) -> None:
    client = _client(operator)
    held = client.get(f"/api/v1/spend/runs/{spend}/reservations").json()
    assert [(r["amount"], r["status"]) for r in held] == [("4.000000", "held")] * 2
    raised = client.post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "25", "reason": "long ticket"},
        content_type="application/json",
    )
    assert raised.status_code == 200 and raised.json()["limit"] == "25.000000"
    again = client.post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "20", "reason": "x"},
        content_type="application/json",
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "ceiling_not_raised"
    missing = client.post(
        f"/api/v1/spend/runs/{spend + 1000}/ceiling",
        {"new_limit": "20", "reason": "x"},
        content_type="application/json",
    )
    assert missing.status_code == 404
    bad = client.post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "-1", "reason": ""},
        content_type="application/json",
    )
    assert bad.status_code == 422


def test_raising_a_ceiling_needs_tier_2(spend: int) -> None:
    tier1 = UserFactory(username="t1", permissions=[*DECIDER, "orchestration.decide_tier_1"])
    refused = _client(tier1).post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "25", "reason": "please"},
        content_type="application/json",
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "ceiling_tier_required"


def test_raising_the_ceiling_of_a_run_needs_the_right_to_decide_for_it(spend: int) -> None:
    """Tier 2 is not enough: raising a run's ceiling answers its escalation, so it takes the
    right to decide for that run's tenant, as retrying or aborting it does."""
    other = Tenant.objects.get(slug="other")
    elsewhere = UserFactory(
        username="other-t2",
        permissions=[
            "orchestration.decide_run",
            "orchestration.decide_workflow",
            "orchestration.decide_tier_1",
            "orchestration.decide_tier_2",
        ],
    )
    assign_perm("policies.view_runs", elsewhere, other)
    assign_perm("policies.decide_runs", elsewhere, other)
    hidden = _client(elsewhere).post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "25", "reason": "not my tenant"},
        content_type="application/json",
    )
    assert hidden.status_code == 404, hidden.content  # a run one may not see is not there
    viewer = UserFactory(
        username="acme-t2-viewer",
        permissions=[
            "orchestration.decide_run",
            "orchestration.decide_workflow",
            "orchestration.decide_tier_1",
            "orchestration.decide_tier_2",
        ],
    )
    assign_perm("policies.view_runs", viewer, Tenant.objects.get(slug="acme"))
    refused = _client(viewer).post(
        f"/api/v1/spend/runs/{spend}/ceiling",
        {"new_limit": "25", "reason": "may see, may not decide"},
        content_type="application/json",
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "decide_denied"
    assert SpendScope.objects.get(kind="run", key=str(spend)).limit == Decimal("10")
