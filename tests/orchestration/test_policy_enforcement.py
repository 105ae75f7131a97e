"""The policy in force decides every agent action before it runs (issue 18): allow, deny,
require an approval at a tier (with a quorum), or defer until a window opens; every decision is
recorded with the version, the rule and the facts, and an edit is checked against the policy."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import Code, PermissionDenied
from orchestration.models import Step, Wait
from orchestration.services import approval_decide, run_submit
from policies.active import active_forget
from policies.models import PolicyDecision
from policies.services import (
    policy_activate,
    policy_draft,
    policy_install,
    policy_review,
    policy_submit,
)
from tests.factories import TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

REFUND = "My headset arrived damaged. I would like a refund, please."

RULES = """
default: allow
rules:
  - id: no-echo-on-sundays
    description: Echoes are not allowed for this tenant
    action: agent:test_echo
    tenant: [closed]
    outcome: {decision: deny, reason: "this tenant takes no echoes"}
  - id: big-refunds
    description: Refunds above 100 need a tier-2 approval by two people
    action: agent:refund_executor
    when:
      - {fact: params.proposal.amount, op: ">", value: 100}
    outcome: {decision: require_approval, tier: 2, quorum: 2, sla: 2h}
  - id: huge-refunds
    description: Refunds above 10,000 need tier 3
    action: agent:refund_executor
    when:
      - {fact: params.proposal.amount, op: ">", value: 10000}
    outcome: {decision: require_approval, tier: 3, sla: 2h}
time_windows:
  daytime:
    description: Notes only by day, the tenant's time
    days: [mon-sun]
    start: "08:00"
    end: "20:00"
    zone: tenant
    applies_to: {action: [agent:customer_notifier]}
    outside: {decision: defer}
"""


@pytest.fixture
def policy() -> Any:
    installed = policy_install(source=RULES, note="tests")
    active_forget()
    return installed.version


def test_an_allowed_action_runs_and_its_decision_is_recorded_with_version_rule_and_facts(
    policy: Any, drive: Any, fast_agents: None
) -> None:
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    assert run.status == "succeeded"
    decisions = list(PolicyDecision.objects.filter(run_id=run.pk).order_by("id"))
    assert [(d.action, d.outcome, d.rule) for d in decisions] == [
        ("agent:test_echo", "allow", "default")
    ] * 4
    first = decisions[0]
    assert first.version_id == policy.pk and first.step_id is not None and first.tenant == "default"
    assert first.facts["params"] == {"text": "t"} and first.facts["workflow"] == "siblings"


def test_a_denied_action_fails_its_run_saying_which_rule_and_why(
    policy: Any, drive: Any, fast_agents: None
) -> None:
    TenantFactory(slug="closed")
    run = drive(run_submit(workflow="siblings", input={"text": "t"}, tenant="closed").run.pk)
    assert run.status == "failed" and run.error_code == Code.POLICY_DENIED
    assert "no-echo-on-sundays" in run.error_message and "takes no echoes" in run.error_message
    step = Step.objects.get(run=run, node="start")
    assert step.status == "failed" and step.error_class == "policy"
    assert PolicyDecision.objects.get(run_id=run.pk).outcome == "deny"


def test_a_refund_above_the_threshold_waits_for_the_tier_and_quorum_the_policy_requires(
    policy: Any, drive: Any, fast_agents: None
) -> None:
    run = drive(run_submit(workflow="refund_desk", input={"message": REFUND}, seed=1).run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    assert (wait.tier, wait.quorum, wait.policy_rule, wait.policy_version) == (
        2,
        2,
        "big-refunds",
        policy.number,
    )
    assert (wait.deadline_at - wait.created_at).total_seconds() == pytest.approx(7200, abs=1)
    assert "two people" in wait.reason
    decided = PolicyDecision.objects.get(run_id=run.pk, action="agent:refund_executor")
    assert (decided.outcome, decided.tier, decided.rule) == ("approve", 2, "big-refunds")


def test_an_edit_that_needs_a_higher_tier_than_the_approver_holds_is_refused(
    policy: Any, drive: Any, fast_agents: None
) -> None:
    run = drive(run_submit(workflow="refund_desk", input={"message": REFUND}, seed=1).run.pk)
    wait = Wait.objects.get(run=run, kind="approval", status="open")
    approver = UserFactory(
        username="tier2",
        permissions=[
            "orchestration.decide_run",
            "orchestration.decide_workflow",
            "orchestration.decide_tier_1",
            "orchestration.decide_tier_2",
            "policies.view_runs",
            "policies.decide_runs",
        ],
    )
    proposal = {**run.state["proposal"], "amount": 987_654_321.0}
    with pytest.raises(PermissionDenied) as refused:
        approval_decide(
            wait_id=wait.pk,
            user=approver,
            decision="edit",
            reason="typo?",
            edited_input={"proposal": proposal},
        )
    assert refused.value.code == Code.EDIT_NEEDS_HIGHER_TIER
    assert "tier 3" in refused.value.message and "huge-refunds" in refused.value.message
    assert Wait.objects.get(pk=wait.pk).status == "open"
    assert Step.objects.get(run=run, node="execute_refund").input_override is None


def test_a_message_outside_the_tenants_daytime_is_deferred_until_the_window_opens(
    policy: Any, drive: Any, fast_agents: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 23:30 in New York (04:30 UTC the next day): the notifier waits until 08:00 there.
    night = datetime(2026, 12, 8, 4, 30, tzinfo=UTC)
    monkeypatch.setattr(timezone, "now", lambda: night)
    TenantFactory(slug="globex", time_zone="America/New_York")
    run = drive(
        run_submit(
            workflow="refund_desk",
            input={"message": "When will my order ship?"},
            tenant="globex",
            seed=2,
        ).run.pk
    )
    notify = Step.objects.get(run=run, node="notify_customer")
    assert notify.status == "queued" and notify.published_at is None
    assert notify.available_at == datetime(2026, 12, 8, 13, 0, tzinfo=UTC)  # 08:00 EST
    assert (
        PolicyDecision.objects.get(run_id=run.pk, action="agent:customer_notifier").outcome
        == "defer"
    )


TOOLS = """
default: allow
rules:
  - id: no-charges
    description: Nothing is charged through this capability
    action: tool:test_effect
    when:
      - {fact: params.text, op: "==", value: "do charge"}
    outcome: {decision: deny, reason: "charges are not allowed here"}
"""

RATE = """
default: allow
rate_limits:
  - id: one-effect-{nonce}
    description: One effect a minute per run
    action: tool:test_effect
    per: run
    limit: 1
    period: 1m
"""


@pytest.fixture
def effects(monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.support.stub_provider import stub_provider_server

    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        yield stub


def test_a_tool_call_the_policy_denies_never_reaches_the_provider_and_is_recorded(
    effects: Any, drive: Any, fast_agents: None, settings: Any
) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}
    policy_install(source=TOOLS)
    active_forget()
    run = drive(run_submit(workflow="saga", input={}).run.pk)
    assert [call.body["text"] for call in effects.requests] == ["do reserve", "undo reserve"]
    charge = Step.objects.get(run=run, node="charge")
    assert (charge.status, charge.error_class, charge.error_code) == (
        "failed",
        "policy",
        "policy_denied",
    )
    assert "charges are not allowed here" in charge.error_message
    tool_decisions = list(
        PolicyDecision.objects.filter(run_id=run.pk, action="tool:test_effect")
        .order_by("id")
        .values_list("outcome", "rule")
    )
    assert tool_decisions == [("allow", "default"), ("deny", "no-charges"), ("allow", "default")]
    assert run.status == "failed"


def test_a_rate_limit_shared_by_workers_holds_back_the_next_call(
    effects: Any, drive: Any, fast_agents: None, settings: Any
) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "RETRY_BASE_SECONDS": 0.0}
    # Buckets live in Redis, shared by every worker: a limit of its own for this test.
    policy_install(source=RATE.format(nonce=secrets.token_hex(4)))
    active_forget()
    run = drive(run_submit(workflow="saga", input={}).run.pk)
    assert [call.body["text"] for call in effects.requests][:1] == ["do reserve"]
    charge = Step.objects.get(run=run, node="charge")
    assert "rate_limited" in [entry["code"] for entry in charge.attempts_log]
    assert "do charge" not in [call.body["text"] for call in effects.requests]


ECHO_NEEDS_APPROVAL = """
default: allow
rules:
  - id: start-needs-a-person
    description: The first echo of an escalating run needs a tier-1 approval
    action: agent:test_echo
    workflow: escalating
    when:
      - {fact: node, op: "==", value: start}
    outcome: {decision: require_approval, tier: 1, sla: 1h}
"""


def test_an_approval_is_bound_to_the_policy_version_that_asked_for_it(
    drive: Any, fast_agents: None, operator: Any
) -> None:
    first = policy_install(source=ECHO_NEEDS_APPROVAL, note="v1").version
    active_forget()
    run = drive(run_submit(workflow="escalating", input={"text": "hi", "fail_attempts": 0}).run.pk)
    asked = Wait.objects.get(run=run, kind="approval", status="open")
    assert asked.policy_version == first.number
    approval_decide(wait_id=asked.pk, user=operator, decision="approve", reason="fine")

    # A new version goes live between the decision and the step's execution.
    author, reviewer = UserFactory(username="author"), UserFactory(username="reviewer")
    second = policy_draft(
        source=ECHO_NEEDS_APPROVAL + "# stricter, one day\n", author=author, note="v2"
    )
    policy_submit(version_id=second.pk, user=author)
    policy_review(version_id=second.pk, user=reviewer, approve=True, note="ok")
    policy_activate(version_id=second.pk, user=reviewer, note="v2")
    active_forget()

    run = drive(run.pk)
    assert run.status == "waiting"
    assert Step.objects.get(run=run, node="start").status == "waiting"  # never executed
    asked_again = Wait.objects.get(run=run, kind="approval", status="open")
    assert asked_again.pk != asked.pk and asked_again.policy_version == second.number
    assert AuditEvent.objects.filter(run_id=run.pk, verb=Verb.APPROVAL_STALE).count() == 1

    # Approved under the version in force, it runs.
    approval_decide(wait_id=asked_again.pk, user=operator, decision="approve", reason="still fine")
    assert drive(run.pk).status == "succeeded"
