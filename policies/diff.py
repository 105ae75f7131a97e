"""A readable diff between two policy documents: what changed, in words, by rule id, window,
allowlist, ceiling, price, rate limit and bounds; and a unified diff of their canonical sources.

``policy_diff(old, new)`` gives lines such as ``rule refund-tier-2: tier 2 -> 3`` and
``ceiling workflow_day refund_desk: limit 50.00 -> 80.00``: the reviewer reads what a version
does differently, not where the text moved.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from policies.conditions import days_text
from policies.document import (
    Ceiling,
    FactCondition,
    PolicyDocument,
    RequireApproval,
    Rule,
    WindowCondition,
)
from policies.source import policy_source_render


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What changed from one document to another."""

    #: One line per change, in the document's section order.
    changes: tuple[str, ...]
    #: A unified diff of the two canonical YAML sources.
    unified: str

    @property
    def unchanged(self) -> bool:
        """Whether the two documents say the same thing."""
        return not self.changes


def policy_diff(
    old: PolicyDocument, new: PolicyDocument, *, old_label: str = "old", new_label: str = "new"
) -> PolicyDiff:
    """The changes from ``old`` to ``new`` in words, and the unified diff of their sources
    (headed ``old_label`` and ``new_label``, e.g. ``v3`` and ``v4``)."""
    changes: list[str] = []
    for name in ("description", "default", "currency"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes.append(f"{name}: {_text(before)} -> {_text(after)}")
    changes += _rules(old.rules, new.rules)
    changes += _named(
        "window",
        {name: _window_dump(window) for name, window in old.time_windows.items()},
        {name: _window_dump(window) for name, window in new.time_windows.items()},
    )
    changes += _allowlists(old, new)
    changes += _named(
        "ceiling",
        {_ceiling_name(ceiling): _dump(ceiling, skip=("scope", "key")) for ceiling in old.ceilings},
        {_ceiling_name(ceiling): _dump(ceiling, skip=("scope", "key")) for ceiling in new.ceilings},
    )
    changes += _named(
        "price",
        {n: _dump(p) for n, p in old.prices.items()},
        {n: _dump(p) for n, p in new.prices.items()},
    )
    changes += _named(
        "rate limit",
        {limit.id: _dump(limit, skip=("id",)) for limit in old.rate_limits},
        {limit.id: _dump(limit, skip=("id",)) for limit in new.rate_limits},
    )
    changes += _named(
        "bounds",
        {n: _dump(b) for n, b in old.bounds.items()},
        {n: _dump(b) for n, b in new.bounds.items()},
    )
    unified = "".join(
        difflib.unified_diff(
            policy_source_render(old).splitlines(keepends=True),
            policy_source_render(new).splitlines(keepends=True),
            fromfile=old_label,
            tofile=new_label,
        )
    )
    return PolicyDiff(tuple(changes), unified)


def _rules(old: list[Rule], new: list[Rule]) -> list[str]:
    before = {rule.id: rule for rule in old}
    after = {rule.id: rule for rule in new}
    changes: list[str] = []
    for rule in old:
        if rule.id not in after:
            changes.append(f"rule {rule.id} removed (was: {rule_summary(rule)})")
    for rule in new:
        if rule.id not in before:
            changes.append(f"rule {rule.id} added: {rule_summary(rule)}")
            continue
        changes += [f"rule {rule.id}: {change}" for change in _rule_changes(before[rule.id], rule)]
    # Order decides only which of two equally strict rules is named as deciding; still shown.
    kept_before = [rule.id for rule in old if rule.id in after]
    kept_after = [rule.id for rule in new if rule.id in before]
    if kept_before != kept_after:
        changes.append(f"rules reordered: {', '.join(kept_before)} -> {', '.join(kept_after)}")
    return changes


def _rule_changes(old: Rule, new: Rule) -> list[str]:
    changes: list[str] = []
    for name in ("description", "action", "workflow", "tenant"):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            changes.append(f"{name} {_text(before)} -> {_text(after)}")
    old_conditions = [condition_text(c) for c in old.when]
    new_conditions = [condition_text(c) for c in new.when]
    if old_conditions != new_conditions:
        removed = [c for c in old_conditions if c not in new_conditions]
        added = [c for c in new_conditions if c not in old_conditions]
        if len(removed) == len(added):
            changes += [f"condition {a} -> {b}" for a, b in zip(removed, added, strict=True)]
        else:
            changes += [f"condition removed: {c}" for c in removed]
            changes += [f"condition added: {c}" for c in added]
        if not removed and not added:
            changes.append("conditions reordered")
    if old.outcome.decision != new.outcome.decision:
        changes.append(f"outcome {outcome_text(old.outcome)} -> {outcome_text(new.outcome)}")
    else:
        changes += _field_changes(
            _dump(old.outcome, skip=("decision",)), _dump(new.outcome, skip=("decision",))
        )
    return changes


def _allowlists(old: PolicyDocument, new: PolicyDocument) -> list[str]:
    changes: list[str] = []
    for name in old.allowlists:
        if name not in new.allowlists:
            changes.append(f"allowlist {name} removed")
    for name, allowlist in new.allowlists.items():
        previous = old.allowlists.get(name)
        if previous is None:
            changes.append(f"allowlist {name} added: {allowlist.kind} {_text(allowlist.entries)}")
            continue
        parts = []
        if previous.kind != allowlist.kind:
            parts.append(f"kind {previous.kind} -> {allowlist.kind}")
        added = [entry for entry in allowlist.entries if entry not in previous.entries]
        removed = [entry for entry in previous.entries if entry not in allowlist.entries]
        if added:
            parts.append(f"added {', '.join(added)}")
        if removed:
            parts.append(f"removed {', '.join(removed)}")
        if previous.description != allowlist.description:
            parts.append(
                f"description {_text(previous.description)} -> {_text(allowlist.description)}"
            )
        if parts:
            changes.append(f"allowlist {name}: {'; '.join(parts)}")
    return changes


def _named(kind: str, old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[str]:
    changes: list[str] = []
    for name in old:
        if name not in new:
            changes.append(f"{kind} {name} removed")
    for name, fields in new.items():
        if name not in old:
            changes.append(
                f"{kind} {name} added: {', '.join(f'{k} {_text(v)}' for k, v in fields.items())}"
            )
            continue
        changes += [f"{kind} {name}: {change}" for change in _field_changes(old[name], fields)]
    return changes


def _field_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes: list[str] = []
    for name in [*old, *(key for key in new if key not in old)]:
        before, after = old.get(name), new.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _field_changes(before, after, f"{prefix}{name}.")
        elif before != after:
            changes.append(f"{prefix}{name} {_text(before)} -> {_text(after)}")
    return changes


def _dump(model: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="python", exclude_none=True)
    return {name: value for name, value in dumped.items() if name not in skip}


def _window_dump(window: Any) -> dict[str, Any]:
    dumped = _dump(window)
    dumped["days"] = days_text(window.days)
    if window.outside is not None:
        dumped["outside"] = outcome_text(window.outside)
    return dumped


def _ceiling_name(ceiling: Ceiling) -> str:
    return (
        f"{ceiling.scope} {ceiling.key}"
        if ceiling.key
        else f"{ceiling.scope} (each)"
        if ceiling.scope != "global_day"
        else ceiling.scope
    )


def _text(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, str) and (" " in value or not value):
        return f'"{value}"'
    return str(value)


def condition_text(condition: FactCondition | WindowCondition) -> str:
    """A condition as one phrase: ``params.amount > 1000``, ``outside business_hours``."""
    if isinstance(condition, WindowCondition):
        return f"{condition.op} {condition.window}"
    operand = condition.allowlist if condition.allowlist is not None else _text(condition.value)
    return f"{' or '.join(condition.fact)} {condition.op} {operand}"


def outcome_text(outcome: Any) -> str:
    """An outcome as one phrase: ``require_approval tier 3, quorum 2, sla 1d``."""
    if isinstance(outcome, RequireApproval):
        stages = outcome.stage_tiers
        text = (
            f"require_approval tier {stages[-1]}"
            if len(stages) == 1
            else f"require_approval stages {' then '.join(map(str, stages))}"
        )
        if outcome.quorum > 1:
            text += f", quorum {outcome.quorum}"
        dumped = outcome.model_dump(mode="python")
        text += f", sla {dumped['sla']}"
        if outcome.on_expiry != "reject":
            text += f", on expiry {outcome.on_expiry}"
        return text
    if outcome.decision == "deny":
        return f"deny ({outcome.reason})"
    if outcome.decision == "defer":
        until = getattr(outcome, "until", None)
        return f"defer until {until} opens" if until else "defer until the window opens"
    return str(outcome.decision)


def rule_summary(rule: Rule) -> str:
    """A rule as one line: ``agent:refund_executor when params.amount > 100: require_approval tier 1``."""
    scope = _text(rule.action if len(rule.action) > 1 else rule.action[0])
    if rule.workflow:
        scope += f" in workflow {_text(rule.workflow)}"
    if rule.tenant:
        scope += f" for tenant {_text(rule.tenant)}"
    conditions = " and ".join(condition_text(c) for c in rule.when)
    return f"{scope}{' when ' + conditions if conditions else ''}: {outcome_text(rule.outcome)}"
