"""Deciding an action: a pure function of (compiled policy version, facts, now) -> Decision.

``compile_policy(document, version=n)`` turns a validated document into a :class:`CompiledPolicy`
once (globs to regexes, paths to readers, zones to ``ZoneInfo``); the engine keeps it per version.
``policy_decide(policy, facts, now)`` then decides an action with no database and no clock but
``now``. What the engine asks of a version around a decision (ceilings, rate limits, bounds,
prices) is in ``policies.limits``.

**How matching rules combine** (the safe choice, and easy to explain):

1. Every rule whose ``action`` (and ``workflow``, ``tenant``, if given) globs match and whose
   conditions all hold *matches*; a window with ``applies_to`` acts as a rule with the id
   ``window:<name>`` that matches outside the window. A ``defer`` rule whose window is open now
   does not match (nothing to wait for).
2. The strictest outcome wins: **deny > require_approval > defer > allow**. No rule matching:
   the document's ``default``.
3. The deciding rule is the one whose outcome won: the first deny in document order; among
   approvals, the highest tier, then the most stages, then the largest quorum (then the first);
   among defers, the one that waits longest; among allows, the first.
4. Approvals are merged so no rule's demand is lost: the quorum is the largest asked for, and an
   expiry rejects if any matching approval says so. If a defer matched too, the approval carries
   its ``defer_until``: once approved, the action still waits until then.
5. At ``defer_until`` the engine decides again: the world (spend, other windows) may have moved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import translate
from typing import Any, Literal

from policies.conditions import (
    Check,
    CompiledWindow,
    Evaluation,
    WindowCheck,
    check_compile,
    wall_text,
    window_compile,
)
from policies.document import (
    Allow,
    Defer,
    DeferUntilOpen,
    Deny,
    PolicyDocument,
    RateLimit,
    RequireApproval,
    zone_get,
)
from policies.facts import Facts

__all__ = ["CompiledPolicy", "Decision", "Facts", "compile_policy", "policy_decide"]

DecisionOutcome = Literal["allow", "deny", "require_approval", "defer"]
RANK = {"allow": 0, "defer": 1, "require_approval": 2, "deny": 3}
#: ``PolicyDecision.outcome`` has 8 characters and calls "require approval" ``approve``.
RECORDED_OUTCOME = {
    "allow": "allow",
    "deny": "deny",
    "require_approval": "approve",
    "defer": "defer",
}
# Distinct (action, workflow, tenant) triples are few in practice; a bound keeps a flood of
# made-up names from growing the cache without limit.
CANDIDATE_CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says about one action, why, and with which version and facts."""

    outcome: DecisionOutcome
    #: The deciding rule's id, ``window:<name>`` for a window that applies to actions, or ``default``.
    rule: str
    reason: str
    facts: Facts
    version: int | None
    #: For require_approval: the highest tier that must sign (the last stage), how many distinct
    #: people at each stage, the stages' tiers in order, how long they have, and what expiry does.
    tier: int = 0
    quorum: int = 0
    stages: tuple[int, ...] = ()
    sla: timedelta | None = None
    on_expiry: Literal["reject", "approve"] | None = None
    #: For defer (and an approval that must also wait): not before this instant (aware, UTC).
    defer_until: datetime | None = None
    #: Every rule that matched, in document order (the deciding one among them).
    matched: tuple[str, ...] = ()

    @property
    def recorded_outcome(self) -> str:
        """The outcome as ``PolicyDecision.outcome`` stores it (``approve`` for an approval)."""
        return RECORDED_OUTCOME[self.outcome]

    def to_json(self) -> dict[str, Any]:
        """The decision as JSON values (for the API, the audit payload and the run page)."""
        return {
            "outcome": self.outcome,
            "rule": self.rule,
            "reason": self.reason,
            "version": self.version,
            "tier": self.tier,
            "quorum": self.quorum,
            "stages": list(self.stages),
            "sla_seconds": int(self.sla.total_seconds()) if self.sla is not None else None,
            "on_expiry": self.on_expiry,
            "defer_until": self.defer_until.isoformat() if self.defer_until is not None else None,
            "matched": list(self.matched),
            "facts": self.facts.to_json(),
        }


Outcome = Allow | Deny | RequireApproval | Defer | DeferUntilOpen


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """A rule (or a governing window) ready to test."""

    id: str
    description: str
    rank: int
    #: Restricting rules (all but allow) match when a fact they test is missing: fail closed.
    restricts: bool
    action: re.Pattern[str]
    workflow: re.Pattern[str] | None
    tenant: re.Pattern[str] | None
    checks: tuple[Check, ...]
    #: The checks' test functions, read once (the hot loop calls these).
    tests: tuple[Callable[[Facts, Evaluation], bool | None], ...]
    outcome: Outcome
    #: The window a defer waits for.
    window: CompiledWindow | None = None
    #: For an approval: (top tier, number of stages, quorum), compared to pick the deciding one.
    demand: tuple[int, int, int] = (0, 0, 0)
    rejects_on_expiry: bool = False

    def covers(self, action: str, workflow: str, tenant: str) -> bool:
        """Whether the rule's globs match the action, workflow and tenant."""
        return (
            self.action.match(action) is not None
            and (self.workflow is None or self.workflow.match(workflow) is not None)
            and (self.tenant is None or self.tenant.match(tenant) is not None)
        )


@dataclass(frozen=True, eq=False)
class CompiledPolicy:
    """A policy version, compiled: decide with :func:`policy_decide`. Immutable apart from
    a cache of which rules cover which (action, workflow, tenant)."""

    document: PolicyDocument
    version: int | None
    default: DecisionOutcome
    rules: tuple[CompiledRule, ...]
    windows: Mapping[str, CompiledWindow]
    #: How many distinct fact paths the rules read (each is read at most once per decision).
    fact_paths: int = 0
    #: Each rate limit of the document with its action globs compiled.
    rate_limits: tuple[tuple[RateLimit, re.Pattern[str]], ...] = ()
    _candidates: dict[tuple[str, str, str], tuple[CompiledRule, ...]] = field(
        default_factory=dict, repr=False
    )
    _limited: dict[str, bool] = field(default_factory=dict, repr=False)
    #: The ceilings per (workflow, agent, tenant), kept by ``policies.limits.ceilings_of``.
    ceiling_shapes: dict[tuple[str, str, str], tuple[Any, ...]] = field(
        default_factory=dict, repr=False
    )

    def rate_limited(self, action: str) -> bool:
        """Whether any rate limit counts ``action`` (worked out once per action)."""
        found = self._limited.get(action)
        if found is None:
            found = any(glob.match(action) is not None for _, glob in self.rate_limits)
            if len(self._limited) >= CANDIDATE_CACHE_SIZE:
                self._limited.clear()
            self._limited[action] = found
        return found

    def candidates(self, facts: Facts) -> tuple[CompiledRule, ...]:
        """The rules whose globs cover the action, workflow and tenant, in document order."""
        key = (facts.action, facts.workflow, facts.tenant)
        found = self._candidates.get(key)
        if found is None:
            found = tuple(rule for rule in self.rules if rule.covers(*key))
            if len(self._candidates) >= CANDIDATE_CACHE_SIZE:
                self._candidates.clear()
            self._candidates[key] = found
        return found


def _globs(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{translate(pattern)})" for pattern in patterns))


def _optional_globs(patterns: list[str] | None) -> re.Pattern[str] | None:
    return None if patterns is None else _globs(patterns)


def compile_policy(document: PolicyDocument, *, version: int | None = None) -> CompiledPolicy:
    """Compile a validated document once, so each decision is fast; ``version`` is the
    ``PolicyVersion.number`` it came from, carried into every decision."""
    windows = {name: window_compile(name, window) for name, window in document.time_windows.items()}
    fact_slots: dict[tuple[str, ...], int] = {}
    rules: list[CompiledRule] = []
    for rule in document.rules:
        outcome = rule.outcome
        rules.append(
            CompiledRule(
                id=rule.id,
                description=rule.description,
                rank=RANK[outcome.decision],
                restricts=outcome.decision != "allow",
                action=_globs(rule.action),
                workflow=_optional_globs(rule.workflow),
                tenant=_optional_globs(rule.tenant),
                checks=(
                    checks := tuple(
                        check_compile(c, windows, document.allowlists, fact_slots)
                        for c in rule.when
                    )
                ),
                tests=tuple(check.test for check in checks),
                outcome=outcome,
                window=windows[outcome.until] if isinstance(outcome, Defer) else None,
                demand=_demand(outcome),
                rejects_on_expiry=getattr(outcome, "on_expiry", "") == "reject",
            )
        )
    for name, window in document.time_windows.items():
        if window.applies_to is None or window.outside is None:
            continue
        compiled = windows[name]
        rules.append(
            CompiledRule(
                id=f"window:{name}",
                description=window.description or f"outside the {name} window",
                rank=RANK[window.outside.decision],
                restricts=True,
                action=_globs(window.applies_to.action),
                workflow=_optional_globs(window.applies_to.workflow),
                tenant=_optional_globs(window.applies_to.tenant),
                checks=(outside := (WindowCheck(compiled, inside=False),)),
                tests=tuple(check.test for check in outside),
                outcome=window.outside,
                window=compiled if isinstance(window.outside, DeferUntilOpen) else None,
                demand=_demand(window.outside),
                rejects_on_expiry=getattr(window.outside, "on_expiry", "") == "reject",
            )
        )
    rate_limits = tuple((limit, _globs(limit.action)) for limit in document.rate_limits)
    return CompiledPolicy(
        document, version, document.default, tuple(rules), windows, len(fact_slots), rate_limits
    )


def policy_decide(policy: CompiledPolicy, facts: Facts, now: datetime) -> Decision:
    """Decide one action: which rules match, and which outcome wins (see the module's notes).
    ``now`` must be aware; it is the only clock."""
    if now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    candidates = policy.candidates(facts)
    if not candidates:  # the common case: nothing to evaluate
        return _default(policy, facts)
    tenant_zone = zone_get(facts.tenant_time_zone)
    assert tenant_zone is not None  # Facts refuse a zone that does not exist
    evaluation = Evaluation(now, tenant_zone, policy.fact_paths)
    matched: list[CompiledRule] = []
    # A rule matches when every test holds; an undecidable one (None) counts as the rule
    # restricts (fail closed). Written out here, not as a method: this loop is where a decision
    # spends its time.
    for rule in candidates:
        restricts = rule.restricts
        for test in rule.tests:
            result = test(facts, evaluation)
            if not (restricts if result is None else result):
                break
        else:
            if rule.window is None or not rule.window.is_open(evaluation):
                matched.append(rule)
    if not matched:
        return _default(policy, facts)
    strongest = max(rule.rank for rule in matched)
    names = tuple(rule.id for rule in matched)
    if strongest == RANK["require_approval"]:
        return _approval(policy, facts, evaluation, matched, names)
    if strongest == RANK["defer"]:
        until, deciding = _latest_defer(matched, evaluation)
        return Decision(
            outcome="defer",
            rule=deciding.id,
            reason=_reason(deciding, facts, evaluation, until, deciding.window),
            facts=facts,
            version=policy.version,
            defer_until=until,
            matched=names,
        )
    deciding = next(rule for rule in matched if rule.rank == strongest)
    return Decision(
        outcome=deciding.outcome.decision,
        rule=deciding.id,
        reason=_reason(deciding, facts, evaluation, None, None),
        facts=facts,
        version=policy.version,
        matched=names,
    )


def _default(policy: CompiledPolicy, facts: Facts) -> Decision:
    return Decision(
        outcome=policy.default,
        rule="default",
        reason=f"no rule matches {facts.action}; the policy's default is {policy.default}",
        facts=facts,
        version=policy.version,
    )


def _approval(
    policy: CompiledPolicy,
    facts: Facts,
    evaluation: Evaluation,
    matched: list[CompiledRule],
    names: tuple[str, ...],
) -> Decision:
    deciding: CompiledRule | None = None
    quorum, rejects, waits = 0, False, False
    for rule in matched:
        if rule.demand[0]:
            if deciding is None or rule.demand > deciding.demand:
                deciding = rule
            quorum = max(quorum, rule.demand[2])
            rejects = rejects or rule.rejects_on_expiry
        waits = waits or rule.window is not None
    assert deciding is not None and isinstance(deciding.outcome, RequireApproval)
    winner = deciding.outcome
    stages = winner.stage_tiers
    until, waiting_for = None, None
    if waits:
        until, deferring = _latest_defer(matched, evaluation)
        waiting_for = deferring.window
    return Decision(
        outcome="require_approval",
        rule=deciding.id,
        reason=_reason(deciding, facts, evaluation, until, waiting_for),
        facts=facts,
        version=policy.version,
        tier=stages[-1],
        quorum=quorum,
        stages=stages,
        sla=winner.sla,
        on_expiry="reject" if rejects else "approve",
        defer_until=until,
        matched=names,
    )


def _demand(outcome: Outcome) -> tuple[int, int, int]:
    if not isinstance(outcome, RequireApproval):
        return (0, 0, 0)
    stages = outcome.stage_tiers
    return (stages[-1], len(stages), outcome.quorum)


def _latest_defer(
    matched: list[CompiledRule], evaluation: Evaluation
) -> tuple[datetime, CompiledRule]:
    latest: tuple[datetime, CompiledRule] | None = None
    for rule in matched:
        if rule.window is None:
            continue
        opening = rule.window.next_opening(evaluation)
        if latest is None or opening > latest[0]:
            latest = (opening, rule)
    assert latest is not None  # callers only ask when a defer matched
    return latest


def _reason(
    rule: CompiledRule,
    facts: Facts,
    evaluation: Evaluation,
    until: datetime | None,
    waiting_for: CompiledWindow | None,
) -> str:
    # Built only for the deciding rule, so a decision pays for one explanation.
    headline = rule.outcome.reason or rule.description
    seen = "; ".join(check.explain(facts, evaluation) for check in rule.checks)
    text = f"{headline}: {seen}" if seen else headline
    if until is not None and waiting_for is not None:
        local = until.astimezone(waiting_for.zone_for(evaluation))
        text += f"; not before {wall_text(local, with_date=True)} ({waiting_for.name} opens)"
    return text
