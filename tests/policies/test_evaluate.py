"""Deciding an action (policies/evaluate.py, policies/conditions.py): every operator and rule
type, failing closed on missing facts, the combination rule, the default; pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from policies.evaluate import (
    Facts,
    compile_policy,
    policy_decide,
)
from policies.limits import bounds_for, ceilings_for, price_cost, rate_limits_for
from tests.policies.documents import (
    ALLOW,
    DENY,
    WEDNESDAY_NOON,
    approval,
    compiled,
    document,
    rule,
)


def decide_params(condition: dict[str, Any], params: dict[str, Any], **facts: Any) -> str:
    """The outcome of a one-rule policy (deny when the condition holds) for these params."""
    policy = compiled(rules=[rule("r", "tool:pay", DENY, condition)])
    return policy_decide(policy, Facts("tool:pay", params=params, **facts), WEDNESDAY_NOON).outcome


@pytest.mark.parametrize(
    ("op", "value", "amount", "holds"),
    [
        (">", 100, 100.01, True),
        (">", 100, 100, False),
        (">=", 100, 100, True),
        (">=", 100, 99.99, False),
        ("<", 100, 99.5, True),
        ("<", 100, 100, False),
        ("<=", 100, 100, True),
        ("<=", 100, 100.5, False),
        ("==", 100, 100.0, True),
        ("==", 100, 101, False),
        ("!=", 100, 101, True),
        ("!=", 100, 100, False),
        ("in", [10, 20, 30], 20, True),
        ("in", [10, 20, 30], 25, False),
        ("not_in", [10, 20, 30], 25, True),
        ("not_in", [10, 20, 30], 30, False),
    ],
)
def test_each_comparison_operator_on_a_number(
    op: str, value: Any, amount: Any, holds: bool
) -> None:
    outcome = decide_params({"fact": "params.amount", "op": op, "value": value}, {"amount": amount})
    assert outcome == ("deny" if holds else "allow")


def test_a_float_fact_meets_a_decimal_threshold_as_written() -> None:
    # 100.1 as a float is a hair below Decimal("100.1"); a reader of the rule expects >= to hold.
    condition = {"fact": "params.amount", "op": ">=", "value": Decimal("100.1")}
    assert decide_params(condition, {"amount": 100.1}) == "deny"
    assert decide_params({**condition, "op": "=="}, {"amount": 100.1}) == "deny"
    assert (
        decide_params({**condition, "op": "in", "value": [Decimal("100.1")]}, {"amount": 100.1})
        == "deny"
    )


@pytest.mark.parametrize("amount", [Decimal("150.25"), "150.25", 151])
def test_decimals_numeric_strings_and_ints_compare_exactly(amount: Any) -> None:
    assert (
        decide_params({"fact": "params.amount", "op": ">", "value": 150}, {"amount": amount})
        == "deny"
    )


def test_strings_compare_for_equality_and_membership() -> None:
    assert (
        decide_params({"fact": "params.currency", "op": "==", "value": "EUR"}, {"currency": "EUR"})
        == "deny"
    )
    assert (
        decide_params({"fact": "params.currency", "op": "!=", "value": "EUR"}, {"currency": "EUR"})
        == "allow"
    )
    assert (
        decide_params(
            {"fact": "params.currency", "op": "in", "value": ["EUR", "USD"]}, {"currency": "GBP"}
        )
        == "allow"
    )
    assert (
        decide_params(
            {"fact": "params.currency", "op": "not_in", "value": ["EUR", "USD"]},
            {"currency": "GBP"},
        )
        == "deny"
    )


def test_booleans_are_not_numbers() -> None:
    assert (
        decide_params({"fact": "params.urgent", "op": "==", "value": True}, {"urgent": True})
        == "deny"
    )
    assert (
        decide_params({"fact": "params.urgent", "op": "==", "value": True}, {"urgent": False})
        == "allow"
    )
    # True is not 1 and not above 0: the comparison cannot be made, and a deny fails closed.
    assert (
        decide_params({"fact": "params.amount", "op": "<", "value": 0}, {"amount": True}) == "deny"
    )


def test_a_nested_parameter_path_and_a_list_index() -> None:
    condition = {"fact": "params.proposal.amount", "op": ">", "value": 100}
    assert decide_params(condition, {"proposal": {"amount": 360.5}}) == "deny"
    assert decide_params(condition, {"proposal": {"amount": 36.5}}) == "allow"
    indexed = {"fact": "params.items.1.price", "op": ">", "value": 10}
    assert decide_params(indexed, {"items": [{"price": 1}, {"price": 11}]}) == "deny"


def test_the_first_present_of_several_fact_paths_is_used() -> None:
    condition = {"fact": ["params.proposal.amount", "params.amount"], "op": ">", "value": 100}
    assert decide_params(condition, {"amount": 500}) == "deny"
    assert decide_params(condition, {"proposal": {"amount": 50}, "amount": 500}) == "allow"


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"amount": None},
        {"amount": "a lot"},
        {"amount": float("nan")},
        {"amount": [1, 2]},
        {"proposal": "x"},
    ],
)
def test_a_restricting_rule_fails_closed_when_its_fact_is_missing_or_unreadable(
    params: dict[str, Any],
) -> None:
    policy = compiled(
        rules=[
            rule("big", "tool:pay", approval(2), {"fact": "params.amount", "op": ">", "value": 100})
        ]
    )
    decision = policy_decide(policy, Facts("tool:pay", params=params), WEDNESDAY_NOON)
    assert (decision.outcome, decision.tier) == ("require_approval", 2)
    assert "params.amount" in decision.reason


def test_an_allowing_rule_does_not_match_when_its_fact_is_missing() -> None:
    policy = compiled(
        default="deny",
        rules=[
            rule("small", "tool:pay", ALLOW, {"fact": "params.amount", "op": "<", "value": 100})
        ],
    )
    assert policy_decide(policy, Facts("tool:pay", params={}), WEDNESDAY_NOON).outcome == "deny"
    assert (
        policy_decide(policy, Facts("tool:pay", params={"amount": 5}), WEDNESDAY_NOON).outcome
        == "allow"
    )


def test_facts_other_than_params_and_spend_so_far() -> None:
    policy = compiled(
        rules=[
            rule("node", "agent:*", DENY, {"fact": "node", "op": "==", "value": "publish"}),
            rule(
                "spend",
                "agent:*",
                approval(3),
                {"fact": "spend.workflow_day", "op": ">=", "value": Decimal("40.00")},
            ),
        ]
    )
    base = {"action": "agent:writer", "workflow": "content", "tenant": "acme"}
    assert policy_decide(policy, Facts(**base, node="publish"), WEDNESDAY_NOON).rule == "node"
    rich = Facts(**base, node="draft", spend={"workflow_day": Decimal("40.00")})
    assert policy_decide(policy, rich, WEDNESDAY_NOON).tier == 3
    poor = Facts(**base, node="draft", spend={"workflow_day": Decimal("39.99")})
    assert policy_decide(policy, poor, WEDNESDAY_NOON).outcome == "allow"


def test_action_workflow_and_tenant_globs() -> None:
    policy = compiled(
        rules=[
            rule("sends", "tool:send_*", DENY, workflow=["refund_*", "support"], tenant="acme*"),
        ]
    )

    def outcome(action: str, workflow: str, tenant: str) -> str:
        return policy_decide(
            policy, Facts(action, workflow=workflow, tenant=tenant), WEDNESDAY_NOON
        ).outcome

    assert outcome("tool:send_email", "refund_desk", "acme-eu") == "deny"
    assert outcome("tool:send_sms", "support", "acme") == "deny"
    assert outcome("tool:send_email", "content", "acme") == "allow"
    assert outcome("tool:send_email", "refund_desk", "globex") == "allow"
    assert outcome("tool:search", "refund_desk", "acme") == "allow"
    assert outcome("agent:send_email", "refund_desk", "acme") == "allow"


ALLOWLISTS = {
    "domains": {"kind": "domains", "entries": ["example.com", "*.example.net"]},
    "people": {"kind": "recipients", "entries": ["ann@partner.org"]},
    "tools": {"kind": "tools", "entries": ["search", "tool:lookup"]},
    "codes": {"kind": "values", "entries": ["A1", "B2"]},
}


def allowlisted(allowlist: str, fact: str, value: Any, action: str = "tool:send_email") -> str:
    policy = compiled(
        allowlists=ALLOWLISTS,
        rules=[
            rule(
                "outside",
                "*",
                approval(1),
                {"fact": fact, "op": "not_in_allowlist", "allowlist": allowlist},
            )
        ],
    )
    params = {} if value is None else {"to": value}
    return policy_decide(policy, Facts(action, params=params), WEDNESDAY_NOON).outcome


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        ("bob@example.com", "allow"),
        ("Bob <BOB@Example.COM>", "allow"),
        ("https://example.com/hook", "allow"),
        ("mail.example.net", "allow"),
        ("bob@mail.example.net", "allow"),
        ("bob@example.net", "require_approval"),  # *.example.net is subdomains only
        ("bob@example.com.evil.io", "require_approval"),
        ("bob@gmail.com", "require_approval"),
        (["a@example.com", "b@gmail.com"], "require_approval"),  # one outside is enough
        (["a@example.com", "b@x.example.net"], "allow"),
        ("not an address", "require_approval"),  # unreadable: fail closed
        (None, "require_approval"),  # missing: fail closed
    ],
)
def test_a_recipient_domain_outside_the_allowlist(value: Any, outcome: str) -> None:
    assert allowlisted("domains", "params.to", value) == outcome


def test_recipient_tool_and_value_allowlists() -> None:
    assert allowlisted("people", "params.to", "Ann@Partner.org") == "allow"
    assert allowlisted("people", "params.to", "bob@partner.org") == "require_approval"
    assert allowlisted("tools", "action", None, action="tool:search") == "allow"
    assert allowlisted("tools", "action", None, action="tool:lookup") == "allow"
    assert allowlisted("tools", "action", None, action="tool:delete_all") == "require_approval"
    assert allowlisted("codes", "params.to", "A1") == "allow"
    assert allowlisted("codes", "params.to", "a1") == "require_approval"


def test_in_allowlist_holds_only_when_every_value_is_inside() -> None:
    policy = compiled(
        default="deny",
        allowlists=ALLOWLISTS,
        rules=[
            rule(
                "inside",
                "tool:send_email",
                ALLOW,
                {"fact": "params.to", "op": "in_allowlist", "allowlist": "domains"},
            )
        ],
    )

    def outcome(to: Any) -> str:
        return policy_decide(
            policy, Facts("tool:send_email", params={"to": to}), WEDNESDAY_NOON
        ).outcome

    assert outcome(["a@example.com", "b@y.example.net"]) == "allow"
    assert outcome(["a@example.com", "b@gmail.com"]) == "deny"
    assert outcome(42) == "deny"


def test_no_matching_rule_gives_the_default_and_says_so() -> None:
    for default in ("allow", "deny"):
        policy = compiled(default=default, version=7, rules=[rule("r", "tool:x", DENY)])
        decision = policy_decide(policy, Facts("agent:classifier"), WEDNESDAY_NOON)
        assert (decision.outcome, decision.rule, decision.version) == (default, "default", 7)
        assert decision.matched == ()
        assert f"default is {default}" in decision.reason


def test_deny_beats_approval_beats_defer_beats_allow() -> None:
    windows = {"never": {"days": ["sun"], "start": "03:00", "end": "03:01", "zone": "UTC"}}
    defer = {"decision": "defer", "until": "never"}
    outcomes = {"allow": ALLOW, "defer": defer, "approval": approval(1), "deny": DENY}
    for present in (
        ["allow", "defer"],
        ["allow", "defer", "approval"],
        ["defer", "approval", "deny", "allow"],
    ):
        policy = compiled(
            time_windows=windows, rules=[rule(name, "tool:x", outcomes[name]) for name in present]
        )
        decision = policy_decide(policy, Facts("tool:x"), WEDNESDAY_NOON)
        strongest = next(name for name in ("deny", "approval", "defer", "allow") if name in present)
        assert decision.rule == strongest
        assert decision.matched == tuple(present)


def test_among_denies_the_first_in_document_order_decides() -> None:
    policy = compiled(
        rules=[
            rule("first", "tool:x", DENY),
            rule("second", "tool:*", {"decision": "deny", "reason": "b"}),
        ]
    )
    decision = policy_decide(policy, Facts("tool:x"), WEDNESDAY_NOON)
    assert (decision.rule, decision.reason) == ("first", "not allowed")


def test_among_approvals_the_highest_tier_decides_and_the_largest_quorum_is_kept() -> None:
    policy = compiled(
        rules=[
            rule("two-people", "tool:pay", approval(1, quorum=2, sla="1h")),
            rule("tier-3", "tool:pay", approval(3, sla="8h")),
            rule("tier-2", "tool:pay", approval(2, on_expiry="approve")),
        ]
    )
    decision = policy_decide(policy, Facts("tool:pay"), WEDNESDAY_NOON)
    assert (decision.rule, decision.tier, decision.quorum, decision.stages) == (
        "tier-3",
        3,
        2,
        (3,),
    )
    assert decision.sla == timedelta(hours=8)
    # One matching approval that rejects on expiry is enough: expiry fails closed.
    assert decision.on_expiry == "reject"


def test_expiry_approves_only_when_every_matching_approval_says_so() -> None:
    policy = compiled(rules=[rule("lenient", "tool:pay", approval(2, on_expiry="approve"))])
    assert policy_decide(policy, Facts("tool:pay"), WEDNESDAY_NOON).on_expiry == "approve"


def test_multi_stage_sign_off() -> None:
    policy = compiled(
        rules=[
            rule("tier-3", "tool:pay", approval(3)),
            rule(
                "board",
                "tool:pay",
                {"decision": "require_approval", "stages": [2, 3], "quorum": 2, "sla": "2d"},
            ),
        ]
    )
    decision = policy_decide(policy, Facts("tool:pay"), WEDNESDAY_NOON)
    # Same top tier; two stages ask more than one.
    assert (decision.rule, decision.tier, decision.stages, decision.quorum) == (
        "board",
        3,
        (2, 3),
        2,
    )
    assert decision.sla == timedelta(days=2)
    assert decision.recorded_outcome == "approve"


def test_a_defer_rule_waits_for_its_window_and_does_nothing_while_it_is_open() -> None:
    windows = {
        "office": {"days": ["mon-fri"], "start": "09:00", "end": "17:00", "zone": "Europe/Berlin"}
    }
    policy = compiled(
        time_windows=windows,
        rules=[rule("later", "tool:batch", {"decision": "defer", "until": "office"})],
    )
    saturday = datetime(2026, 6, 20, 10, 0, tzinfo=UTC)
    decision = policy_decide(policy, Facts("tool:batch"), saturday)
    assert decision.outcome == "defer"
    assert decision.defer_until == datetime(2026, 6, 22, 7, 0, tzinfo=UTC)  # Monday 09:00 CEST
    assert "not before Mon 2026-06-22 09:00 CEST" in decision.reason
    inside = policy_decide(policy, Facts("tool:batch"), WEDNESDAY_NOON)
    assert (inside.outcome, inside.rule, inside.matched) == ("allow", "default", ())


def test_among_defers_the_longest_wait_decides() -> None:
    windows = {
        "soon": {"days": ["mon-sun"], "start": "13:00", "end": "14:00", "zone": "UTC"},
        "later": {"days": ["mon-sun"], "start": "18:00", "end": "19:00", "zone": "UTC"},
    }
    policy = compiled(
        time_windows=windows,
        rules=[
            rule("soon", "tool:x", {"decision": "defer", "until": "soon"}),
            rule("later", "tool:x", {"decision": "defer", "until": "later"}),
        ],
    )
    decision = policy_decide(policy, Facts("tool:x"), WEDNESDAY_NOON)
    assert (decision.rule, decision.defer_until) == ("later", WEDNESDAY_NOON.replace(hour=18))


def test_an_approval_that_also_must_wait_carries_the_wait() -> None:
    windows = {
        "daytime": {
            "days": ["mon-sun"],
            "start": "08:00",
            "end": "20:00",
            "zone": "tenant",
            "applies_to": {"action": "tool:send_email"},
            "outside": {"decision": "defer"},
        }
    }
    policy = compiled(time_windows=windows, rules=[rule("check", "tool:send_email", approval(1))])
    night = datetime(2026, 6, 17, 22, 0, tzinfo=UTC)  # midnight in Berlin
    decision = policy_decide(
        policy, Facts("tool:send_email", tenant_time_zone="Europe/Berlin"), night
    )
    assert (decision.outcome, decision.rule, decision.tier) == ("require_approval", "check", 1)
    assert decision.defer_until == datetime(2026, 6, 18, 6, 0, tzinfo=UTC)
    assert decision.matched == ("check", "window:daytime")


def test_a_window_that_applies_to_actions_can_require_an_approval_outside() -> None:
    windows = {
        "office": {
            "days": ["mon-fri"],
            "start": "09:00",
            "end": "18:00",
            "zone": "America/New_York",
            "applies_to": {"action": "agent:*", "workflow": "refund_desk"},
            "outside": {"decision": "require_approval", "tier": 2, "sla": "12h"},
        }
    }
    policy = compiled(time_windows=windows)
    facts = Facts("agent:refund_executor", workflow="refund_desk")
    evening = datetime(2026, 6, 17, 23, 30, tzinfo=UTC)  # 19:30 in New York
    decision = policy_decide(policy, facts, evening)
    assert (decision.outcome, decision.rule, decision.tier) == (
        "require_approval",
        "window:office",
        2,
    )
    assert "outside office" in decision.reason
    assert policy_decide(policy, facts, WEDNESDAY_NOON).outcome == "require_approval"  # 08:00 in NY
    assert policy_decide(policy, facts, WEDNESDAY_NOON + timedelta(hours=2)).outcome == "allow"
    assert (
        policy_decide(policy, Facts("agent:refund_executor", workflow="content"), evening).outcome
        == "allow"
    )


def test_a_window_condition_inside_or_outside() -> None:
    windows = {"office": {"days": ["mon-fri"], "start": "09:00", "end": "18:00", "zone": "UTC"}}
    policy = compiled(
        time_windows=windows,
        rules=[
            rule("after-hours", "tool:pay", approval(2), {"window": "office"}),
            rule("in-hours", "tool:pay", approval(1), {"window": "office", "op": "inside"}),
        ],
    )
    assert policy_decide(policy, Facts("tool:pay"), WEDNESDAY_NOON).rule == "in-hours"
    assert (
        policy_decide(policy, Facts("tool:pay"), WEDNESDAY_NOON.replace(hour=20)).rule
        == "after-hours"
    )


def test_the_reason_says_what_the_rule_saw() -> None:
    policy = compiled(
        rules=[
            rule(
                "big", "tool:pay", approval(2), {"fact": "params.amount", "op": ">", "value": 1000}
            )
        ]
    )
    decision = policy_decide(policy, Facts("tool:pay", params={"amount": 1500}), WEDNESDAY_NOON)
    assert decision.reason == "rule big: params.amount is 1500, > 1000"


def test_the_reason_names_the_fact_that_had_the_value_of_a_condition_reading_several() -> None:
    either = {"fact": ["params.proposal.amount", "params.amount"], "op": ">", "value": 1000}
    policy = compiled(rules=[rule("big", "tool:pay", approval(2), either)])
    at = WEDNESDAY_NOON
    nested = Facts("tool:pay", params={"proposal": {"amount": 2500}})
    assert policy_decide(policy, nested, at).reason == (
        "rule big: params.proposal.amount is 2500, > 1000"
    )
    flat = Facts("tool:pay", params={"amount": 1500})
    assert policy_decide(policy, flat, at).reason == "rule big: params.amount is 1500, > 1000"
    missing = policy_decide(policy, Facts("tool:pay", params={}), at)
    assert "params.proposal.amount or params.amount is missing" in missing.reason


def test_a_decision_records_its_facts_and_version_as_json() -> None:
    policy = compiled(version=4, rules=[rule("big", "tool:pay", approval(2, sla="30m"))])
    facts = Facts(
        "tool:pay",
        workflow="w",
        tenant="t",
        params={"amount": 5},
        spend={"run": Decimal("0.25")},
        run_id=9,
    )
    decision = policy_decide(policy, facts, WEDNESDAY_NOON)
    data = decision.to_json()
    assert data["version"] == 4 and data["rule"] == "big" and data["sla_seconds"] == 1800
    assert data["facts"]["spend"] == {"run": "0.25"}
    assert Facts.from_json(data["facts"]) == facts


def test_now_must_be_aware_and_facts_must_name_a_real_action_and_zone() -> None:
    policy = compiled()
    with pytest.raises(ValueError, match="aware"):
        policy_decide(policy, Facts("tool:x"), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="agent:<name>"):
        Facts("send_email")
    with pytest.raises(ValueError, match="time zone"):
        Facts("tool:x", tenant_time_zone="Mars/Olympus")
    with pytest.raises(ValueError, match="kind"):
        Facts("tool:x", kind="agent")
    with pytest.raises(ValueError, match="scopes"):
        Facts("tool:x", spend={"week": Decimal(1)})


def test_the_candidate_cache_gives_the_same_answers() -> None:
    policy = compiled(rules=[rule("a", "tool:*", DENY, workflow="w1")])
    for _ in range(3):
        assert (
            policy_decide(policy, Facts("tool:x", workflow="w1"), WEDNESDAY_NOON).outcome == "deny"
        )
        assert (
            policy_decide(policy, Facts("tool:x", workflow="w2"), WEDNESDAY_NOON).outcome == "allow"
        )


CEILINGS = [
    {"scope": "run", "limit": "0.50"},
    {"scope": "workflow_day", "limit": "10"},
    {"scope": "workflow_day", "key": "refund_desk", "limit": "50.00", "soft_ratio": "0.9"},
    {"scope": "agent_day", "key": "writer", "limit": "3"},
    {"scope": "tenant_month", "limit": "100"},
    {"scope": "global_day", "limit": "500"},
]


def test_ceilings_for_an_action_one_per_scope_the_keyed_one_first() -> None:
    policy = compile_policy(document(ceilings=CEILINGS))
    facts = Facts(
        "agent:refund_executor",
        workflow="refund_desk",
        agent="refund_executor",
        tenant="acme",
        run_id=42,
    )
    found = {c.scope: (c.key, c.limit, c.soft_ratio) for c in ceilings_for(policy, facts)}
    assert found == {
        "run": ("42", Decimal("0.50"), Decimal("0.8")),
        "workflow_day": ("refund_desk", Decimal("50.00"), Decimal("0.9")),
        "tenant_month": ("acme", Decimal("100"), Decimal("0.8")),
        "global_day": ("", Decimal("500"), Decimal("0.8")),
    }
    other = {
        c.scope: c.key
        for c in ceilings_for(policy, Facts("agent:writer", workflow="content", agent="writer"))
    }
    assert other == {"workflow_day": "content", "agent_day": "writer", "global_day": ""}


def test_ceilings_worked_out_once_per_workflow_still_count_against_each_runs_own_row() -> None:
    policy = compile_policy(document(ceilings=CEILINGS))

    def run_keys(run_id: int | None) -> list[tuple[str, str]]:
        facts = Facts(
            "agent:refund_executor",
            workflow="refund_desk",
            agent="refund_executor",
            tenant="acme",
            run_id=run_id,
        )
        return [(c.scope, c.key) for c in ceilings_for(policy, facts)]

    shared = [("workflow_day", "refund_desk"), ("tenant_month", "acme"), ("global_day", "")]
    assert run_keys(7) == [("run", "7"), *shared]
    assert run_keys(8) == [("run", "8"), *shared]
    assert run_keys(None) == shared  # no run: its ceiling cannot be counted
    assert run_keys(9) == [("run", "9"), *shared]


def test_rate_limits_for_an_action_name_their_bucket() -> None:
    limits = [
        {"id": "email", "action": "tool:send_email", "per": "tenant", "limit": 30, "period": "1m"},
        {"id": "all-tools", "action": "tool:*", "limit": 1000, "period": "1h"},
    ]
    policy = compile_policy(document(rate_limits=limits))
    buckets = rate_limits_for(policy, Facts("tool:send_email", tenant="acme"))
    assert [(b.key, b.limit, b.period) for b in buckets] == [
        ("email:tenant=acme", 30, timedelta(minutes=1)),
        ("all-tools", 1000, timedelta(hours=1)),
    ]
    assert rate_limits_for(policy, Facts("agent:writer")) == ()


def test_bounds_merge_the_workflow_over_the_general_entry() -> None:
    policy = compile_policy(
        document(
            bounds={
                "*": {"max_retries": 5, "run_deadline": "1d"},
                "refund_desk": {"max_retries": 2, "max_fan_out": 4},
            }
        )
    )
    own = bounds_for(policy, "refund_desk")
    assert (own.max_retries, own.run_deadline, own.max_fan_out, own.max_loop_iterations) == (
        2,
        timedelta(days=1),
        4,
        None,
    )
    assert bounds_for(policy, "content").max_retries == 5
    assert bounds_for(compile_policy(document()), "x").max_retries is None


def test_price_cost_from_tokens_rounded_up_and_none_for_an_unknown_model() -> None:
    policy = compile_policy(
        document(prices={"small": {"input_per_1k": "0.00015", "output_per_1k": "0.0006"}})
    )
    assert price_cost(policy, "small", 1000, 1000) == Decimal("0.000750")
    assert price_cost(policy, "small", 1, 0) == Decimal("0.000001")  # 0.00000015, rounded up
    assert price_cost(policy, "large", 10, 10) is None


AWKWARD_VALUES: list[Any] = [
    None,
    0,
    1,
    99,
    100,
    101,
    -5,
    100.0,
    100.1,
    99.99,
    float("nan"),
    float("inf"),
    float("-inf"),
    Decimal("100"),
    Decimal("100.10"),
    Decimal("NaN"),
    "100",
    "100.5",
    " 99 ",
    "1_000",
    "abc",
    "",
    True,
    False,
    [100],
    {"amount": 100},
    "EUR",
    "USD",
    "GBP",
]


@pytest.mark.parametrize(
    "condition",
    [
        {"op": op, "value": value}
        for op in (">", ">=", "<", "<=")
        for value in (100, Decimal("100.1"), -5)
    ]
    + [
        {"op": op, "value": value}
        for op in ("==", "!=")
        for value in (100, Decimal("100.1"), "EUR", True)
    ]
    + [
        {"op": op, "value": [100, Decimal("100.1"), "EUR", "USD", False]} for op in ("in", "not_in")
    ],
)
def test_the_fast_checks_agree_with_their_plain_definition(condition: dict[str, Any]) -> None:
    # The hot path folds the read and the common number types into one function; the plain
    # `compare` is the definition. Both must answer the same for anything a fact may hold.
    from policies.conditions import Evaluation, FactCheck, check_compile
    from policies.document import FactCondition

    check = check_compile(
        FactCondition.model_validate({"fact": "params.x", **condition}), {}, {}, {}
    )
    assert isinstance(check, FactCheck)
    for value in AWKWARD_VALUES:
        facts = Facts("tool:x", params={"x": value})
        fast = check.test(facts, Evaluation(WEDNESDAY_NOON, UTC, 1))  # type: ignore[arg-type]
        plain = None if value is None else check.compare(value)
        assert fast == plain, (condition, value)
