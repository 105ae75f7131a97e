"""Who may decide what (issue 18): approval tiers, object permissions on the tenant, nobody
approving their own run, N-of-M quorums of distinct people and multi-stage sign-off; who sees
which tenant's runs; every refusal a clear 403, recorded in the audit log."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from django.test import Client
from guardian.shortcuts import assign_perm

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Wait
from orchestration.services import run_submit
from tests.factories import TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

APPROVALS = "/api/v1/approvals"


def _decide(client: Client, wait: Wait, **body: Any) -> Any:
    body = {"decision": "approve", **body}
    return client.post(f"{APPROVALS}/{wait.pk}/decide", body, content_type="application/json")


def _person(name: str, tier: int, tenant: Any, *, may_decide_tenant: bool) -> Any:
    """An operator of ``tier`` who sees ``tenant``'s runs and submits for it, and decides for it
    only with the object permission."""
    user = UserFactory(
        username=name,
        permissions=[
            "orchestration.decide_run",
            "orchestration.decide_workflow",
            "orchestration.add_run",
            *(f"orchestration.decide_tier_{n}" for n in range(1, tier + 1)),
        ],
    )
    for perm in (
        "policies.view_runs",
        "policies.submit_runs",
        *(["policies.decide_runs"] if may_decide_tenant else []),
    ):
        assign_perm(perm, user, tenant)
    return user


@pytest.fixture
def tenant() -> Any:
    return TenantFactory(slug="acme")


@pytest.fixture
def approval_for(drive: Any, tenant: Any) -> Any:
    def make(
        submitted_by: Any, tier: int, quorum: int = 1, stages: list[int] | None = None
    ) -> Wait:
        run = run_submit(
            workflow="reference_workload",
            input={"needs_approval": True},
            submitted_by=submitted_by,
            tenant=tenant.slug,
        ).run
        drive(run.pk)
        wait = Wait.objects.get(run=run, kind="approval", status="open")
        # What a policy decides (its tier, quorum and stages), set as the policy would.
        Wait.objects.filter(pk=wait.pk).update(tier=tier, quorum=quorum, stages=stages or [])
        wait.refresh_from_db()
        return wait

    return make


MATRIX = list(itertools.product((1, 2, 3), (1, 2, 3), (True, False), (True, False)))


@pytest.mark.parametrize(
    ("held", "required", "with_permission", "own"),
    MATRIX,
    ids=[
        f"tier{h}-needs{r}-{'perm' if p else 'noperm'}-{'own' if o else 'other'}"
        for h, r, p, o in MATRIX
    ],
)
def test_the_tier_matrix(
    held: int,
    required: int,
    with_permission: bool,
    own: bool,
    tenant: Any,
    approval_for: Any,
    requester: Any,
    client_for: Any,
) -> None:
    person = _person("decider", held, tenant, may_decide_tenant=with_permission)
    wait = approval_for(person if own else requester, required)
    response = _decide(client_for(person), wait, reason="checked")
    if not with_permission:
        expected = "decide_denied"
    elif held < required:
        expected = "tier_too_low"
    elif own:
        expected = "self_approval"
    else:
        expected = None
    if expected is None:
        assert response.status_code == 200, response.content
        assert Wait.objects.get(pk=wait.pk).status == "approved"
        return
    assert response.status_code == 403, response.content
    error = response.json()["error"]
    assert error["code"] == expected
    assert Wait.objects.get(pk=wait.pk).status == "open"
    denial = AuditEvent.objects.filter(verb=Verb.ACCESS_DENIED, actor_id="decider").last()
    assert denial is not None and denial.data["code"] == expected and denial.run_id == wait.run_id


def test_a_refusal_for_a_low_tier_says_which_tier_can_act(
    tenant: Any, approval_for: Any, requester: Any, client_for: Any
) -> None:
    person = _person("junior", 1, tenant, may_decide_tenant=True)
    wait = approval_for(requester, 3)
    error = _decide(client_for(person), wait, reason="x").json()["error"]
    assert error["detail"]["required_tier"] == 3 and error["detail"]["your_tier"] == 1
    assert "needs tier 3" in error["message"] and "tier 3 or above" in error["message"]


def test_a_quorum_needs_distinct_people_and_the_run_waits_until_it_is_met(
    tenant: Any, approval_for: Any, requester: Any, client_for: Any, drive: Any
) -> None:
    first, second = (_person(n, 3, tenant, may_decide_tenant=True) for n in ("ana", "ben"))
    wait = approval_for(requester, 3, quorum=2)
    one = _decide(client_for(first), wait, reason="looks right")
    assert one.status_code == 200 and one.json()["status"] == "open"  # one of two
    again = _decide(client_for(first), wait, reason="still right")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_voted"
    assert drive(wait.run_id).status == "waiting"
    two = _decide(client_for(second), wait, reason="agreed")
    assert two.status_code == 200 and two.json()["status"] == "approved"
    assert drive(wait.run_id).status == "succeeded"
    assert list(wait.votes.order_by("id").values_list("user__username", flat=True)) == [
        "ana",
        "ben",
    ]


def test_a_multi_stage_sign_off_goes_tier_2_then_tier_3_by_different_people(
    tenant: Any, approval_for: Any, requester: Any, client_for: Any, drive: Any
) -> None:
    manager, director = (
        _person("manager", 2, tenant, may_decide_tenant=True),
        _person("director", 3, tenant, may_decide_tenant=True),
    )
    wait = approval_for(requester, 2, stages=[2, 3])
    assert _decide(client_for(manager), wait, reason="ok at my level").json()["status"] == "open"
    assert Wait.objects.get(pk=wait.pk).tier == 3  # now the second stage's
    refused = _decide(
        client_for(_person("manager2", 2, tenant, may_decide_tenant=True)), wait, reason="me too"
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "tier_too_low"
    assert _decide(client_for(director), wait, reason="signed").json()["status"] == "approved"
    assert drive(wait.run_id).status == "succeeded"


def test_an_edit_of_an_approval_that_needs_several_people_is_refused(
    tenant: Any, approval_for: Any, requester: Any, client_for: Any
) -> None:
    wait = approval_for(requester, 1, quorum=2)
    response = _decide(
        client_for(_person("ana", 3, tenant, may_decide_tenant=True)),
        wait,
        decision="edit",
        reason="smaller",
        edited_input={"draft": "x"},
    )
    assert (
        response.status_code == 409
        and response.json()["error"]["code"] == "edit_needs_single_approval"
    )


def test_an_approval_is_found_only_on_runs_the_operator_may_see(
    tenant: Any, approval_for: Any, requester: Any, client_for: Any
) -> None:
    """Seen through the tenant, through a grant of the one run, as its submitter; otherwise the
    approval does not exist for them (404, nothing decided), whatever their tier."""
    ours = approval_for(requester, 1)
    globex = TenantFactory(slug="globex")
    theirs = approval_for(requester, 1)
    Run.objects.filter(pk=theirs.run_id).update(tenant=globex)
    person = _person("acme-operator", 3, tenant, may_decide_tenant=True)
    client = client_for(person)

    hidden = _decide(client, theirs, reason="not mine to see")
    assert hidden.status_code == 404, hidden.content
    assert hidden.json()["error"]["code"] == "approval_not_found"
    assert Wait.objects.get(pk=theirs.pk).status == "open"

    # The one run granted (and its tenant's deciding permission): found, then decided.
    assign_perm("orchestration.view_run", person, Run.objects.get(pk=theirs.run_id))
    assign_perm("policies.decide_runs", person, globex)
    assert _decide(client, theirs, reason="granted").status_code == 200
    assert _decide(client, ours, reason="my tenant").status_code == 200

    # Their own run on a tenant they do not see: found, and refused as theirs.
    own = approval_for(person, 1)
    Run.objects.filter(pk=own.run_id).update(tenant=globex)
    refused = _decide(client, own, reason="mine")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "self_approval"


def test_operators_see_only_the_runs_of_tenants_they_may_see(
    client_for: Any, requester: Any
) -> None:
    acme, globex = TenantFactory(slug="acme"), TenantFactory(slug="globex")
    person = UserFactory(username="acme-operator", permissions=[])
    assign_perm("policies.view_runs", person, acme)
    ours = run_submit(
        workflow="reference_workload", input={}, submitted_by=requester, tenant="acme"
    ).run
    theirs = run_submit(
        workflow="reference_workload", input={}, submitted_by=requester, tenant="globex"
    ).run
    client = client_for(person)
    listed = {item["id"] for item in client.get("/api/v1/runs").json()["items"]}
    assert listed == {ours.pk}
    assert client.get(f"/api/v1/runs/{ours.pk}").status_code == 200
    assert client.get(f"/api/v1/runs/{theirs.pk}").status_code == 404
    assert Run.objects.get(pk=theirs.pk).tenant_id == globex.pk


def test_submitting_for_a_tenant_needs_its_permission_and_an_unknown_one_is_404(
    client_for: Any,
) -> None:
    TenantFactory(slug="acme")
    TenantFactory(slug="globex")
    person = UserFactory(username="acme-submitter", permissions=["orchestration.add_run"])
    assign_perm("policies.submit_runs", person, TenantFactory(slug="acme"))
    client = client_for(person)
    body = {"workflow": "reference_workload", "input": {}}
    assert (
        client.post(
            "/api/v1/runs", {**body, "tenant": "acme"}, content_type="application/json"
        ).status_code
        == 201
    )
    refused = client.post(
        "/api/v1/runs", {**body, "tenant": "globex"}, content_type="application/json"
    )
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "tenant_denied"
    unknown = client.post(
        "/api/v1/runs", {**body, "tenant": "initech"}, content_type="application/json"
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_tenant"
    assert not Run.objects.filter(tenant__slug="globex").exists()
