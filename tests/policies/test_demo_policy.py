"""The demo policy (policies/demo_policy.yaml) loads and decides the cases it documents, with
the demo's real agents, workflows and input shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orchestration.agents.demo.refunds import CustomerNotifier, RefundExecutor
from orchestration.registry import BUILTIN_AGENTS
from policies.evaluate import (
    Decision,
    Facts,
    compile_policy,
    policy_decide,
)
from policies.limits import bounds_for, ceilings_for, price_cost, rate_limits_for
from policies.source import policy_source_parse

DEMO = compile_policy(
    policy_source_parse(
        (Path(__file__).resolve().parents[2] / "policies" / "demo_policy.yaml").read_text()
    ),
    version=1,
)
# Tuesday 16 June 2026: 11:00 and 21:30 in Berlin (CEST, UTC+2).
TUESDAY_MORNING = datetime(2026, 6, 16, 9, 0, tzinfo=UTC)
TUESDAY_NIGHT = datetime(2026, 6, 16, 19, 30, tzinfo=UTC)
SATURDAY_NOON = datetime(2026, 6, 20, 10, 0, tzinfo=UTC)


def agent_step(agent: str, params: dict[str, Any], node: str, now: datetime) -> Decision:
    facts = Facts(
        f"agent:{agent}",
        workflow="refund_desk",
        node=node,
        tenant="acme",
        tenant_time_zone="Europe/Berlin",
        agent=agent,
        params=params,
        run_id=7,
    )
    return policy_decide(DEMO, facts, now)


def refund(amount: Any, now: datetime = TUESDAY_MORNING, currency: str = "EUR") -> Decision:
    # Exactly the refund executor's input: {"proposal": {...}} as its contract dumps it.
    proposal = {
        "order_id": "ord_demo_5001",
        "amount": amount,
        "currency": currency,
        "reason": "damaged",
    }
    params = (
        RefundExecutor.Input.model_validate({"proposal": proposal}).model_dump()
        if isinstance(amount, float)
        else {"proposal": proposal}
    )
    return agent_step("refund_executor", params, "execute_refund", now)


@pytest.mark.parametrize(
    ("amount", "tier", "quorum", "rule"),
    [
        (40.0, 0, 0, "default"),
        (100.0, 0, 0, "default"),
        (100.01, 1, 1, "refund-tier-1"),
        (1000.0, 1, 1, "refund-tier-1"),
        (1000.5, 2, 1, "refund-tier-2"),
        (10000.0, 2, 1, "refund-tier-2"),
        (15000.0, 3, 2, "refund-tier-3"),
    ],
)
def test_refund_tiers_in_business_hours(amount: float, tier: int, quorum: int, rule: str) -> None:
    decision = refund(amount)
    assert (decision.tier, decision.quorum, decision.rule) == (tier, quorum, rule)
    assert decision.outcome == ("allow" if tier == 0 else "require_approval")
    if tier:
        assert decision.on_expiry == "reject"


def test_a_refund_above_100_outside_business_hours_needs_tier_2() -> None:
    for now in (TUESDAY_NIGHT, SATURDAY_NOON):
        decision = refund(360.5, now)
        assert (decision.outcome, decision.tier, decision.rule) == (
            "require_approval",
            2,
            "refund-after-hours",
        )
        assert decision.sla == timedelta(hours=12)
    assert refund(60.0, TUESDAY_NIGHT).outcome == "allow"
    assert refund(15000.0, TUESDAY_NIGHT).tier == 3


def test_a_refund_in_another_currency_or_without_an_amount() -> None:
    assert refund(50.0, currency="JPY").outcome == "deny"
    unreadable = agent_step(
        "refund_executor", {"proposal": {"order_id": "x"}}, "execute_refund", TUESDAY_MORNING
    )
    # No amount, no currency: every refund rule fails closed and the deny wins.
    assert (unreadable.outcome, unreadable.rule) == ("deny", "refund-currency")
    no_amount = agent_step(
        "refund_executor", {"proposal": {"currency": "EUR"}}, "execute_refund", TUESDAY_MORNING
    )
    assert (no_amount.outcome, no_amount.tier, no_amount.quorum) == ("require_approval", 3, 2)


def test_an_issue_refund_tool_call_is_tiered_by_its_amount() -> None:
    facts = Facts(
        "tool:issue_refund",
        workflow="refund_desk",
        tenant="acme",
        tenant_time_zone="Europe/Berlin",
        params={"amount": "1500.00", "currency": "EUR"},
    )
    assert policy_decide(DEMO, facts, TUESDAY_MORNING).tier == 2


def test_customer_messages_wait_for_the_tenants_daytime() -> None:
    params = CustomerNotifier.Input(
        customer_id="cus_1", refund_id="re_1", refund_amount=360.5
    ).model_dump()
    assert (
        agent_step("customer_notifier", params, "notify_customer", TUESDAY_MORNING).outcome
        == "allow"
    )
    decision = agent_step("customer_notifier", params, "notify_customer", TUESDAY_NIGHT)
    assert (decision.outcome, decision.rule) == ("defer", "window:customer_hours")
    assert decision.defer_until == datetime(2026, 6, 17, 6, 0, tzinfo=UTC)  # 08:00 CEST
    # The same moment for a tenant in New York is 15:30: inside its window.
    new_york = Facts(
        "agent:customer_notifier",
        tenant="globex",
        tenant_time_zone="America/New_York",
        params=params,
    )
    assert policy_decide(DEMO, new_york, TUESDAY_NIGHT).outcome == "allow"


def test_email_outside_the_allowlist_needs_tier_1() -> None:
    def email(to: str, now: datetime = TUESDAY_MORNING) -> Decision:
        facts = Facts(
            "tool:send_email",
            tenant="acme",
            tenant_time_zone="Europe/Berlin",
            params={"to": to, "subject": "Refund"},
        )
        return policy_decide(DEMO, facts, now)

    assert email("ann@example.com").outcome == "allow"
    assert email("ann@shop.example.net").outcome == "allow"
    outside = email("ann@gmail.com")
    assert (outside.outcome, outside.tier, outside.rule) == (
        "require_approval",
        1,
        "email-outside-allowlist",
    )
    late = email("ann@gmail.com", TUESDAY_NIGHT)
    assert (late.outcome, late.defer_until) == (
        "require_approval",
        datetime(2026, 6, 17, 6, 0, tzinfo=UTC),
    )
    assert email("ann@example.com", TUESDAY_NIGHT).outcome == "defer"


def test_other_agents_fall_to_the_default() -> None:
    decision = agent_step(
        "triage_router", {"message": "Where is my parcel?"}, "triage", TUESDAY_NIGHT
    )
    assert (decision.outcome, decision.rule) == ("allow", "default")


def test_ceilings_prices_rate_limits_and_bounds_of_the_demo() -> None:
    facts = Facts(
        "agent:refund_proposer",
        workflow="refund_desk",
        agent="refund_proposer",
        tenant="acme",
        run_id=7,
    )
    assert {c.scope: (c.key, c.limit) for c in ceilings_for(DEMO, facts)} == {
        # A refund conversation has a run ceiling of its own, far below the others'.
        "run": ("7", Decimal("0.0015")),
        "workflow_day": ("refund_desk", Decimal("0.05")),
        "tenant_month": ("acme", Decimal("50.00")),
        "global_day": ("", Decimal("10.00")),
    }
    content = Facts(
        "agent:writer", workflow="content_pipeline", agent="writer", tenant="acme", run_id=8
    )
    others = {c.scope: (c.key, c.limit) for c in ceilings_for(DEMO, content)}
    assert others["run"] == ("8", Decimal("0.05"))
    assert others["workflow_day"] == ("content_pipeline", Decimal("0.10"))
    assert price_cost(DEMO, "demo-model", 400, 40) == Decimal("0.000084")
    [bucket] = rate_limits_for(DEMO, Facts("tool:send_email", tenant="acme"))
    assert (bucket.key, bucket.limit, bucket.period) == (
        "email-per-tenant:tenant=acme",
        30,
        timedelta(minutes=1),
    )
    assert bounds_for(DEMO, "refund_desk").max_retries == 2
    assert bounds_for(DEMO, "content_pipeline").max_retries == 5


def test_every_agent_the_demo_policy_names_exists() -> None:
    named = {
        pattern.removeprefix("agent:")
        for rule in DEMO.document.rules
        for pattern in rule.action
        if pattern.startswith("agent:")
    } | {
        pattern.removeprefix("agent:")
        for window in DEMO.document.time_windows.values()
        if window.applies_to
        for pattern in window.applies_to.action
        if pattern.startswith("agent:")
    }
    assert named and named <= set(BUILTIN_AGENTS)
