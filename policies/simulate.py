"""Simulation: what a draft would have decided for recorded actions, against the current
version; pure.

The caller loads the history (``PolicyDecision`` rows: facts, outcome, tier, rule, when) and
passes plain :class:`RecordedAction` values. Each action is decided again by both versions at
the moment it happened (so windows see the hour it ran, ceilings the spend it saw), and the
result says what would change: how many actions move from which outcome to which, by action
and by deciding rule, with examples — "37 agent:refund_executor actions that were allowed
would require a tier-2 approval (rule refund-tier-2)".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from policies.evaluate import CompiledPolicy, Decision, policy_decide
from policies.facts import Facts

#: Recorded outcomes in either vocabulary: the decision's and ``PolicyDecision.outcome``'s.
OUTCOME_NAMES = {"approve": "require_approval"}


@dataclass(frozen=True, slots=True)
class RecordedAction:
    """One action as it was recorded: its facts (a :class:`Facts` or their JSON), the outcome
    and tier it got, the rule that decided, and when."""

    facts: Facts | Mapping[str, Any]
    outcome: str
    decided_at: datetime
    tier: int = 0
    rule: str = ""
    #: The record's id (``PolicyDecision.id``), so an example can link to it.
    id: int | None = None


@dataclass(frozen=True, slots=True, order=True)
class Verdict:
    """An outcome as simulation groups it: approvals by tier and quorum."""

    outcome: str
    tier: int = 0
    quorum: int = 0

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        """The verdict of a decision."""
        if decision.outcome == "require_approval":
            return cls(decision.outcome, decision.tier, decision.quorum)
        return cls(decision.outcome)

    def __str__(self) -> str:
        if self.outcome != "require_approval":
            return self.outcome
        return f"require_approval tier {self.tier}" + (
            f" quorum {self.quorum}" if self.quorum > 1 else ""
        )

    def was(self, *, one: bool = False) -> str:
        """As what happened: ``were allowed``, ``needed a tier-2 approval`` (``one``: of a
        single action, ``was allowed``)."""
        verb = "was" if one else "were"
        return {
            "allow": f"{verb} allowed",
            "deny": f"{verb} denied",
            "defer": f"{verb} deferred",
        }.get(self.outcome) or f"needed a tier-{self.tier} approval{self._people()}"

    def would(self) -> str:
        """As what would happen: ``would be denied``, ``would require a tier-2 approval``."""
        return {
            "allow": "would be allowed",
            "deny": "would be denied",
            "defer": "would be deferred",
        }.get(self.outcome) or f"would require a tier-{self.tier} approval{self._people()}"

    def _people(self) -> str:
        return f" from {self.quorum} people" if self.quorum > 1 else ""


@dataclass(frozen=True, slots=True)
class SimulatedAction:
    """One recorded action with what the current version and the draft decide for it."""

    record: RecordedAction
    facts: Facts
    current: Decision
    draft: Decision


@dataclass
class Change:
    """Every action whose verdict moves from ``before`` (the current version's) to ``after``
    (the draft's): how many, by action and by the draft's deciding rule, with examples."""

    before: Verdict
    after: Verdict
    count: int = 0
    by_action: Counter[str] = field(default_factory=Counter)
    by_rule: Counter[str] = field(default_factory=Counter)
    examples: list[SimulatedAction] = field(default_factory=list)

    def sentence(self) -> str:
        """The change in one sentence, for the admin reviewing the draft."""
        one = self.count == 1
        actions = (
            f"{self.count} {next(iter(self.by_action))} action{'' if one else 's'}"
            if len(self.by_action) == 1
            else f"{self.count} actions ({', '.join(f'{n} {a}' for a, n in self.by_action.most_common())})"
        )
        rules = ", ".join(rule for rule, _ in self.by_rule.most_common())
        label = "rule" if len(self.by_rule) == 1 else "rules"
        return f"{actions} that {self.before.was(one=one)} {self.after.would()} ({label} {rules})"


@dataclass(frozen=True, slots=True)
class RuleCount:
    """How many actions a rule decided under the current version and under the draft."""

    current: int
    draft: int


@dataclass
class Simulation:
    """What a draft would change over a history of recorded actions."""

    total: int = 0
    changed: int = 0
    #: Changes, the largest first.
    changes: list[Change] = field(default_factory=list)
    current_outcomes: Counter[str] = field(default_factory=Counter)
    draft_outcomes: Counter[str] = field(default_factory=Counter)
    #: Per deciding rule (``default`` included): actions decided under each version.
    rules: dict[str, RuleCount] = field(default_factory=dict)
    #: Records whose recorded outcome is not what the current version decides now (decided by
    #: an older version, or recorded before a fact was added): the baseline is the current one.
    recorded_differs: int = 0
    #: Records that could not be read back, with the reason (record id or position).
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def sentences(self) -> list[str]:
        """The headline: one sentence per change, largest first; or that nothing changes."""
        if not self.changed:
            return [
                f"No change: the draft decides all {self.total} recorded actions as the current version does."
            ]
        return [change.sentence() for change in self.changes]


def policy_simulate(
    draft: CompiledPolicy,
    current: CompiledPolicy,
    history: Iterable[RecordedAction],
    *,
    examples: int = 5,
) -> Simulation:
    """Decide every recorded action with both versions, at the time it was decided, and count
    what would change; keep up to ``examples`` actions per change, in history order."""
    result = Simulation()
    changes: dict[tuple[Verdict, Verdict], Change] = {}
    current_rules: Counter[str] = Counter()
    draft_rules: Counter[str] = Counter()
    for position, record in enumerate(history):
        try:
            facts = (
                record.facts if isinstance(record.facts, Facts) else Facts.from_json(record.facts)
            )
            now_current = policy_decide(current, facts, record.decided_at)
            now_draft = policy_decide(draft, facts, record.decided_at)
        except (ValueError, TypeError) as exc:
            result.skipped.append((record.id if record.id is not None else position, str(exc)))
            continue
        result.total += 1
        before, after = Verdict.of(now_current), Verdict.of(now_draft)
        result.current_outcomes[str(before)] += 1
        result.draft_outcomes[str(after)] += 1
        current_rules[now_current.rule] += 1
        draft_rules[now_draft.rule] += 1
        recorded = OUTCOME_NAMES.get(record.outcome, record.outcome)
        if recorded != now_current.outcome or (
            recorded == "require_approval" and record.tier != now_current.tier
        ):
            result.recorded_differs += 1
        if before == after:
            continue
        result.changed += 1
        change = changes.get((before, after))
        if change is None:
            change = changes[(before, after)] = Change(before, after)
        change.count += 1
        change.by_action[facts.action] += 1
        change.by_rule[now_draft.rule] += 1
        if len(change.examples) < examples:
            change.examples.append(SimulatedAction(record, facts, now_current, now_draft))
    result.changes = sorted(
        changes.values(), key=lambda change: (-change.count, change.before, change.after)
    )
    result.rules = {
        rule: RuleCount(current_rules[rule], draft_rules[rule])
        for rule in sorted(set(current_rules) | set(draft_rules))
    }
    return result
