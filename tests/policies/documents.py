"""Small documents for the policy tests, built from plain dicts as an admin would write them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from policies.document import PolicyDocument
from policies.evaluate import CompiledPolicy, compile_policy

#: A Wednesday at noon UTC: inside most business-hours windows.
WEDNESDAY_NOON = datetime(2026, 6, 17, 12, 0, tzinfo=UTC)


def document(default: str = "allow", **sections: Any) -> PolicyDocument:
    """A validated document with the given sections."""
    return PolicyDocument.model_validate({"default": default, **sections})


def compiled(default: str = "allow", version: int | None = 1, **sections: Any) -> CompiledPolicy:
    """A compiled document with the given sections."""
    return compile_policy(document(default, **sections), version=version)


def rule(
    rule_id: str,
    action: str | list[str],
    outcome: dict[str, Any],
    *when: dict[str, Any],
    **match: Any,
) -> dict[str, Any]:
    """A rule as a dict: ``rule("r", "tool:x", DENY, {"fact": ..., "op": ..., "value": ...})``."""
    return {
        "id": rule_id,
        "description": f"rule {rule_id}",
        "action": action,
        "when": list(when),
        "outcome": outcome,
        **match,
    }


DENY = {"decision": "deny", "reason": "not allowed"}
ALLOW = {"decision": "allow"}


def approval(tier: int = 1, **fields: Any) -> dict[str, Any]:
    """A require_approval outcome."""
    return {"decision": "require_approval", "tier": tier, **fields}


# --- the refund policy as an admin writes it (YAML), shared by the API, page and browser tests ---

#: Refunds above 100 need a tier-1 approval.
REFUND_TIER_1 = """default: allow
rules:
  - id: refund-tier-1
    description: Refunds above 100 need a tier-1 approval
    action: agent:refund_executor
    when:
      - {fact: params.amount, op: ">", value: 100}
    outcome: {decision: require_approval, tier: 1}
"""

#: The same rule asking for tier 2: a changed rule.
REFUND_TIER_1_RAISED = REFUND_TIER_1.replace(
    "value: 100}\n    outcome: {decision: require_approval, tier: 1}",
    "value: 100}\n    outcome: {decision: require_approval, tier: 2}",
)

#: A second rule added: refunds above 50 need tier 2.
REFUND_TIER_2_ADDED = (
    REFUND_TIER_1
    + """  - id: refund-tier-2
    description: Refunds above 50 need a tier-2 approval
    action: agent:refund_executor
    when:
      - {fact: params.amount, op: ">", value: 50}
    outcome: {decision: require_approval, tier: 2}
"""
)

#: Line 8 asks for tier 7 (tiers are 1 to 3): its problem must name the field and that line.
REFUND_TIER_7 = REFUND_TIER_1.replace("tier: 1}", "tier: 7}")
REFUND_TIER_7_LINE = 8


#: Both parallel steps of the reference workload need an approval: two open at once in one run.
BOTH_BRANCHES_NEED_APPROVAL = """
default: allow
rules:
  - id: research-needs-a-person
    description: Each research branch needs a tier-1 approval
    action: agent:noop
    workflow: reference_workload
    when:
      - {fact: node, op: in, value: [research_a, research_b]}
    outcome: {decision: require_approval, tier: 1, sla: 1h}
"""


#: Cost ceilings on a run (its limit as ``%s``) and on the day, and the price of the model the
#: test agents call. ``test_priced_pure``: a worst case of 100 tokens in and out (0.0003),
#: reports 50 and 50 (0.00015).
PRICED = """
default: allow
ceilings:
  - {scope: run, limit: %s}
  - {scope: global_day, limit: 10.00}
prices:
  known-model: {input_per_1k: 0.001, output_per_1k: 0.002}
"""
PRICED_WORST, PRICED_CALL = Decimal("0.0003"), Decimal("0.00015")
