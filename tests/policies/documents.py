"""Small documents for the policy tests, built from plain dicts as an admin would write them."""

from __future__ import annotations

from datetime import UTC, datetime
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
