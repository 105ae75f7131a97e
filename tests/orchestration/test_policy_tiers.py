"""The tier matrix of issue 18, end to end: the active policy's refund thresholds decide the tier
an action waits for, and each operator tier by each threshold by with and without the object
permissions (on the tenant, on the workflow) by their own run or someone else's is decided
through the service the API and the inbox share. A refusal is a 403 with its code, recorded in
the audit log, and leaves the approval open; an allowed approval lets the run finish."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from guardian.shortcuts import assign_perm

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import Code, Conflict, PermissionDenied
from orchestration.models import Wait, WorkflowRecord
from orchestration.recovery import expire_waits
from orchestration.services import approval_decide, run_submit
from policies.services import policy_install
from tests.factories import TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

POLICY = """
default: allow
rules:
  - id: refund-tier-1
    description: Refunds above 100 need tier 1
    action: agent:test_echo
    workflow: tiered_refund
    when:
      - {fact: params.amount, op: ">", value: 100}
    outcome: {decision: require_approval, tier: 1}
  - id: refund-tier-2
    description: Refunds above 1,000 need tier 2
    action: agent:test_echo
    workflow: tiered_refund
    when:
      - {fact: params.amount, op: ">", value: 1000}
    outcome: {decision: require_approval, tier: 2}
  - id: refund-tier-3
    description: Refunds above 10,000 need tier 3
    action: agent:test_echo
    workflow: tiered_refund
    when:
      - {fact: params.amount, op: ">", value: 10000}
    outcome: {decision: require_approval, tier: 3}
"""
#: An amount just past each threshold, and the tier the policy asks for it.
THRESHOLDS = {1: 100.01, 2: 1000.5, 3: 10001}
PERMISSIONS = ("tenant+workflow", "no tenant", "no workflow")
MATRIX = list(itertools.product((1, 2, 3), THRESHOLDS, PERMISSIONS, ("own", "other")))


def _operator(name: str, tier: int, tenant: Any, permissions: str) -> Any:
    """An operator of ``tier`` who sees ``tenant``'s runs and submits for it; deciding needs
    the object permissions on the tenant and on the workflow, each granted here or not."""
    user = UserFactory(
        username=name,
        permissions=[
            "orchestration.decide_run",
            "orchestration.add_run",
            *(f"orchestration.decide_tier_{n}" for n in range(1, tier + 1)),
        ],
    )
    assign_perm("policies.view_runs", user, tenant)
    assign_perm("policies.submit_runs", user, tenant)
    if permissions != "no tenant":
        assign_perm("policies.decide_runs", user, tenant)
    if permissions != "no workflow":
        record, _ = WorkflowRecord.objects.get_or_create(name="tiered_refund")
        assign_perm("orchestration.decide_workflow", user, record)
    return user


@pytest.mark.parametrize(
    ("held", "required", "permissions", "whose"),
    MATRIX,
    ids=[f"tier{h}-needs{r}-{p.replace(' ', '_')}-{w}" for h, r, p, w in MATRIX],
)
def test_the_tier_matrix(
    held: int,
    required: int,
    permissions: str,
    whose: str,
    requester: Any,
    drive: Any,
    fast_agents: None,
) -> None:
    policy_install(source=POLICY, note="tier matrix")
    tenant = TenantFactory(slug="acme")
    person = _operator("decider", held, tenant, permissions)
    submitter = person if whose == "own" else requester
    run = run_submit(
        workflow="tiered_refund",
        input={"amount": THRESHOLDS[required], "text": "refund"},
        submitted_by=submitter,
        tenant="acme",
    ).run
    drive(run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    assert (wait.tier, wait.policy_rule) == (required, f"refund-tier-{required}")

    if permissions != "tenant+workflow":
        expected: str | None = Code.DECIDE_DENIED
    elif held < required:
        expected = Code.TIER_TOO_LOW
    elif whose == "own":
        expected = Code.SELF_APPROVAL
    else:
        expected = None

    if expected is None:
        approval_decide(wait_id=wait.pk, user=person, decision="approve", reason="checked")
        assert drive(run.pk).status == "succeeded"
        return
    with pytest.raises(PermissionDenied) as refused:
        approval_decide(wait_id=wait.pk, user=person, decision="approve", reason="checked")
    assert refused.value.code == expected
    assert Wait.objects.get(pk=wait.pk).status == "open"
    denial = AuditEvent.objects.get(verb=Verb.ACCESS_DENIED, actor_id="decider")
    assert denial.run_id == run.pk and denial.data["code"] == expected


@pytest.mark.parametrize(("on_expiry", "status"), [(None, "failed"), ("approve", "succeeded")])
def test_an_approval_the_policy_asked_for_fails_closed_when_it_expires_unless_the_policy_says_otherwise(
    on_expiry: str | None, status: str, requester: Any, drive: Any, fast_agents: None
) -> None:
    outcome = "{decision: require_approval, tier: 1, sla: 30m}"
    if on_expiry is not None:
        outcome = outcome.replace("}", f", on_expiry: {on_expiry}}}")
    policy_install(
        source=POLICY.replace("{decision: require_approval, tier: 1}", outcome), note="expiry"
    )
    TenantFactory(slug="acme")
    run = run_submit(
        workflow="tiered_refund",
        input={"amount": THRESHOLDS[1], "text": "refund"},
        submitted_by=requester,
        tenant="acme",
    ).run
    drive(run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    assert (wait.deadline_at - wait.created_at).total_seconds() == pytest.approx(1800, abs=1)
    # Nobody answers in time: the deadline has passed when the engine's tick looks.
    Wait.objects.filter(pk=wait.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert expire_waits() == 1
    run = drive(run.pk)
    assert run.status == status
    if status == "failed":
        assert run.error_code == "approval_expired"
    with pytest.raises(Conflict):
        approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="too late")
