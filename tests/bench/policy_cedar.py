"""The same policies in Cedar (``cedarpy``), decided over the same traffic as
``tests.bench.policy_decisions``, to compare decision latency, error messages and diffs.

    python -m tests.bench.policy_cedar                 # needs: pip install cedarpy
    python -m tests.bench.policy_cedar --decisions 20000

Cedar answers allow or deny. Approval tiers are modelled the usual Cedar way: each tier is a
``forbid ... unless { context.approved_tier >= N }`` with ``@tier`` and ``@outcome``
annotations, asked with ``approved_tier`` 0, and the tier is read from the forbidding policies'
annotations. Cedar has no time zones: the caller puts the tenant's local weekday and minute in
the context (and computes a deferral's end itself). Rows: ``is_authorized`` alone on prebuilt
requests, and the whole decision (facts to request, ``is_authorized``, outcome and tier from
the annotations). Not a dependency of Signalbox: without cedarpy this prints a note and exits.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from policies.comparisons import domain_of
from policies.document import zone_get
from policies.evaluate import Facts, compile_policy, policy_decide
from policies.source import policy_source_problems
from tests.bench.policy_decisions import (
    CLOCKS,
    demo_padded,
    measure,
    print_header,
    print_row,
    traffic,
)

REFUNDS = '[Action::"agent:refund_executor", Action::"tool:issue_refund"]'
MESSAGES = '[Action::"agent:customer_notifier", Action::"tool:send_email", Action::"tool:send_sms"]'
AMOUNT_OVER = "(!(context has amount_cents) || context.amount_cents > {cents})"  # fail closed


def cedar_demo(rules: int) -> tuple[str, dict[str, tuple[str, int, int]]]:
    """The demo policy (padded to ``rules`` like ours) in Cedar, and each policy's outcome,
    tier and quorum by its ``@id``."""
    meta: dict[str, tuple[str, int, int]] = {}
    policies = ['@id("default")\npermit(principal, action, resource);']

    def forbid(policy_id: str, outcome: str, tier: int, quorum: int, scope: str, when: str) -> None:
        meta[policy_id] = (outcome, tier, quorum)
        unless = (
            f"\nunless {{ context.approved_tier >= {tier} }}"
            if outcome == "require_approval"
            else ""
        )
        policies.append(
            f'@id("{policy_id}") @outcome("{outcome}") @tier("{tier}")\n'
            f"forbid(principal, {scope if 'resource' in scope else scope + ', resource'})\nwhen {{ {when} }}{unless};"
        )

    for tier, cents, quorum in ((1, 10_000, 1), (2, 100_000, 1), (3, 1_000_000, 2)):
        forbid(
            f"refund-tier-{tier}",
            "require_approval",
            tier,
            quorum,
            f"action in {REFUNDS}",
            AMOUNT_OVER.format(cents=cents),
        )
    business_hours = (
        "context.local_weekday < 5 && context.local_minute >= 540 && context.local_minute < 1080"
    )
    forbid(
        "refund-after-hours",
        "require_approval",
        2,
        1,
        f"action in {REFUNDS}",
        f"{AMOUNT_OVER.format(cents=10_000)} && !({business_hours})",
    )
    forbid(
        "email-outside-allowlist",
        "require_approval",
        1,
        1,
        'action == Action::"tool:send_email"',
        '!(context has recipient_domain) || !(["example.com", "example.org"].contains(context.recipient_domain) '
        '|| context.recipient_domain like "*.example.net")',
    )
    forbid(
        "refund-currency",
        "deny",
        0,
        0,
        f"action in {REFUNDS}",
        '!(context has currency) || !(["EUR", "USD", "GBP"].contains(context.currency))',
    )
    forbid(
        "window:customer_hours",
        "defer",
        0,
        0,
        f"action in {MESSAGES}",
        "context.local_minute < 480 || context.local_minute >= 1200",
    )
    for index in range(rules - len(meta)):
        kind = index % 4
        if kind == 0:
            forbid(
                f"tenant-refund-{index}",
                "require_approval",
                2,
                1,
                f'action == Action::"agent:refund_executor", resource == Tenant::"tenant-{index % 20}"',
                AMOUNT_OVER.format(cents=(500 + index) * 100),
            )
        elif kind == 1:
            forbid(
                f"tool-{index}",
                "deny",
                0,
                0,
                f'action == Action::"tool:tool_{index}"',
                f"!(context has size) || context.size >= {index}",
            )
        elif kind == 2:
            forbid(
                f"priority-{index}",
                "require_approval",
                1,
                1,
                "action",
                f'context.kind == "tool" && context.workflow == "workflow_{index}" '
                '&& (!(context has priority) || context.priority == "high")',
            )
        else:
            forbid(
                f"run-spend-{index}",
                "require_approval",
                2,
                1,
                "action",
                f'context.kind == "agent" && (!(context has spend_run_micros) || context.spend_run_micros > {40_000 + index * 1000})',
            )
    return "\n\n".join(policies) + "\n", meta


def _cents(value: Any) -> int | None:
    try:
        return int(Decimal(str(value)) * 100)
    except (InvalidOperation, ValueError):
        return None


def cedar_request(facts: Facts, now: datetime) -> dict[str, Any]:
    """The Cedar request for an action: what our conditions read, flattened into the context
    as Cedar types (money in cents, spend in millionths, local time in the tenant's zone)."""
    params = facts.params
    proposal = params.get("proposal") if isinstance(params.get("proposal"), dict) else {}
    local = now.astimezone(zone_get(facts.tenant_time_zone))
    context: dict[str, Any] = {
        "approved_tier": 0,
        "kind": facts.kind,
        "workflow": facts.workflow,
        "local_weekday": local.weekday(),
        "local_minute": local.hour * 60 + local.minute,
    }
    amount = _cents(proposal.get("amount", params.get("amount")))
    if amount is not None:
        context["amount_cents"] = amount
    currency = proposal.get("currency", params.get("currency"))
    if isinstance(currency, str):
        context["currency"] = currency
    if isinstance(params.get("to"), str) and (domain := domain_of(params["to"])):
        context["recipient_domain"] = domain
    for name in ("priority", "size"):
        if name in params:
            context[name] = params[name]
    if "run" in facts.spend:
        context["spend_run_micros"] = int(facts.spend["run"] * 1_000_000)
    kind, _, name = facts.action.partition(":")
    return {
        "principal": {"type": "Agent" if kind == "agent" else "Tool", "id": name},
        "action": {"type": "Action", "id": facts.action},
        "resource": {"type": "Tenant", "id": facts.tenant or "-"},
        "context": context,
    }


RANK = {"allow": 0, "defer": 1, "require_approval": 2, "deny": 3}


def cedar_outcome(result: Any, meta: dict[str, tuple[str, int, int]]) -> tuple[str, int]:
    """Outcome and tier from a Cedar answer: allow, or the strictest forbidding policy."""
    if result.allowed:
        return ("allow", 0)
    forbidding = [
        meta[policy_id] for policy_id in result.diagnostics.id_annotations_by_reason.values()
    ]
    outcome = max(forbidding, key=lambda item: (RANK[item[0]], item[1]))
    return (outcome[0], outcome[1])


def main() -> None:
    try:
        import cedarpy
    except ImportError:
        print("cedarpy is not installed (pip install cedarpy): the Cedar comparison is skipped")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--pool", type=int, default=5_000)
    args = parser.parse_args()
    mix = traffic(args.pool)
    entities = cedarpy.Entities.from_json_str("[]")
    print_header("Cedar (cedarpy) against ours, same traffic", args.decisions)
    for rules in (10, 100):
        text, meta = cedar_demo(rules)
        policy_set = cedarpy.PolicySet.from_str(text)
        ours = compile_policy(demo_padded(rules), version=1)
        # The translation must decide as ours does (outcome and tier), or the timing means nothing.
        differing = 0
        for facts, now in mix:
            mine = policy_decide(ours, facts, now)
            theirs = cedar_outcome(
                cedarpy.is_authorized(cedar_request(facts, now), policy_set, entities), meta
            )
            differing += (mine.outcome, mine.tier) != theirs
        print(
            f"-- {rules} rules: Cedar decides {len(mix) - differing} of {len(mix)} actions as ours does"
        )
        requests = {id(facts): cedar_request(facts, now) for facts, now in mix}

        def authorize_only(
            facts: Facts, now: datetime, ps: Any = policy_set, prebuilt: Any = requests
        ) -> object:
            return cedarpy.is_authorized(prebuilt[id(facts)], ps, entities)

        def whole_decision(
            facts: Facts, now: datetime, ps: Any = policy_set, m: Any = meta
        ) -> object:
            return cedar_outcome(cedarpy.is_authorized(cedar_request(facts, now), ps, entities), m)

        def our_decision(facts: Facts, now: datetime, p: Any = ours) -> object:
            return policy_decide(p, facts, now)

        rows: list[tuple[str, Callable[[Facts, datetime], object]]] = [
            ("ours: policy_decide", our_decision),
            ("cedar: is_authorized only", authorize_only),
            ("cedar: facts -> request -> outcome", whole_decision),
        ]
        for label, decide in rows:
            for clock, timer in CLOCKS.items():
                print_row(label, rules, clock, measure(decide, mix, args.decisions, timer))
    print_messages(cedarpy)


def print_messages(cedarpy: Any) -> None:
    """The error messages and diffs the docs compare, as each engine gives them."""
    text, _ = cedar_demo(10)
    print("\n== a syntax error (a missing ';'; cedarpy gives no line or column) ==")
    try:
        cedarpy.PolicySet.from_str(text.replace("resource);", "resource)", 1))
    except ValueError as exc:
        print(f"cedar: {exc}")
    print(
        "ours: "
        + "; ".join(
            map(
                str,
                policy_source_problems("default: allow\nrules:\n  - id: a\n   description: b\n"),
            )
        )
    )
    print("\n== a misspelt attribute or field ==")
    schema = (
        "entity Agent; entity Tool; entity Tenant;\n"
        'action "agent:refund_executor", "tool:issue_refund" appliesTo { principal: [Agent, Tool], '
        "resource: [Tenant], context: { amount_cents?: Long, approved_tier: Long, currency?: String, "
        "local_weekday: Long, local_minute: Long, kind: String, workflow: String } };\n"
    )
    refunds_only = "\n\n".join(part for part in text.split("\n\n") if "refund-tier" in part)
    result = cedarpy.validate_policies(
        refunds_only.replace("context.amount_cents >", "context.amount_cent >", 1), schema
    )
    for error in result.errors:
        print(f"cedar: {error}")
    ours_text = "default: allow\nrules:\n  - id: r\n    description: R\n    action: agent:refund_executor\n    when: [{fact: params.proposal.amount, op: '>', valeu: 100}]\n    outcome: {decision: require_approval, tier: 1}\n"
    for problem in policy_source_problems(ours_text):
        print(f"ours: {problem}")
    print("\n== a diff: refund-tier-2 asks tier 3 instead of 2 ==")
    blocks = text.split("\n\n")
    changed = "\n\n".join(
        block.replace('@tier("2")', '@tier("3")').replace(
            "approved_tier >= 2", "approved_tier >= 3"
        )
        if '@id("refund-tier-2")' in block
        else block
        for block in blocks
    )
    sys.stdout.writelines(
        difflib.unified_diff(
            text.splitlines(True), changed.splitlines(True), "v1.cedar", "v2.cedar", n=1
        )
    )


if __name__ == "__main__":
    main()
