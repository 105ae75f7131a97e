"""Simulation (policies/simulate.py): a draft replayed against a crafted history gives exactly
the expected changes, counts per rule, and examples."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policies.evaluate import Facts, compile_policy
from policies.simulate import Change, RecordedAction, RuleCount, Verdict, policy_simulate
from policies.source import policy_source_parse

DEMO_TEXT = (Path(__file__).resolve().parents[2] / "policies" / "demo_policy.yaml").read_text()
# Tuesday 2026-06-16, 10:00 in Berlin (business hours) and 22:00 in Berlin (outside them).
OFFICE_HOURS = datetime(2026, 6, 16, 8, 0, tzinfo=UTC)
LATE_EVENING = datetime(2026, 6, 16, 20, 0, tzinfo=UTC)


def refund(
    amount: float, at: datetime, outcome: str, tier: int = 0, record_id: int = 0
) -> RecordedAction:
    facts = Facts(
        "agent:refund_executor",
        workflow="refund_desk",
        node="execute_refund",
        tenant="acme",
        tenant_time_zone="Europe/Berlin",
        agent="refund_executor",
        params={
            "proposal": {
                "order_id": f"ord_{record_id}",
                "amount": amount,
                "currency": "EUR",
                "reason": "damaged",
            }
        },
    )
    # Recorded as the engine stores it: facts as JSON, PolicyDecision's outcome words.
    return RecordedAction(facts.to_json(), outcome, at, tier=tier, id=record_id)


def notification(at: datetime, outcome: str, record_id: int) -> RecordedAction:
    facts = Facts(
        "agent:customer_notifier",
        workflow="refund_desk",
        tenant="acme",
        tenant_time_zone="Europe/Berlin",
        params={"customer_id": "c1", "channel": "email"},
    )
    return RecordedAction(facts, outcome, at, id=record_id)


def history() -> list[RecordedAction]:
    actions = []
    actions += [
        refund(60.0, OFFICE_HOURS + timedelta(minutes=n), "allow", record_id=n)
        for n in range(1, 38)
    ]  # 37
    actions += [refund(1500.0, OFFICE_HOURS, "approve", 2, record_id=100 + n) for n in range(3)]
    actions += [refund(250.0, OFFICE_HOURS, "approve", 1, record_id=200)]
    actions += [refund(250.0, LATE_EVENING, "approve", 2, record_id=201)]
    actions += [notification(LATE_EVENING, "defer", 300), notification(OFFICE_HOURS, "allow", 301)]
    # Recorded by an older version that approved everything above 20: not what v1 says now.
    actions += [refund(30.0, OFFICE_HOURS, "approve", 1, record_id=400)]
    actions += [RecordedAction({"action": "nonsense"}, "allow", OFFICE_HOURS, id=500)]
    return actions


def test_a_draft_replayed_against_history_gives_exactly_the_expected_changes() -> None:
    current = compile_policy(policy_source_parse(DEMO_TEXT), version=1)
    draft_text = DEMO_TEXT.replace(
        'op: ">", value: 100}\n    outcome: {decision: require_approval, tier: 1',
        'op: ">", value: 50}\n    outcome: {decision: require_approval, tier: 1',
        1,
    )
    draft_text = draft_text.replace('op: ">", value: 1000}', 'op: ">", value: 2000}', 1)
    assert draft_text.count("value: 50}") == 1 and "value: 2000}" in draft_text
    draft = compile_policy(policy_source_parse(draft_text), version=2)

    result = policy_simulate(draft, current, history(), examples=2)

    assert result.total == 45
    assert result.skipped == [
        (500, "action 'nonsense' must be 'agent:<name>' or 'tool:<capability>'")
    ]
    assert result.changed == 40
    assert [(str(c.before), str(c.after), c.count, dict(c.by_rule)) for c in result.changes] == [
        ("allow", "require_approval tier 1", 37, {"refund-tier-1": 37}),
        ("require_approval tier 2", "require_approval tier 1", 3, {"refund-tier-1": 3}),
    ]
    first = result.changes[0]
    assert [example.record.id for example in first.examples] == [1, 2]
    assert first.examples[0].current.rule == "default" and first.examples[0].draft.tier == 1
    assert first.by_action == {"agent:refund_executor": 37}
    assert result.sentences() == [
        "37 agent:refund_executor actions that were allowed would require a tier-1 approval (rule refund-tier-1)",
        "3 agent:refund_executor actions that needed a tier-2 approval would require a tier-1 approval (rule refund-tier-1)",
    ]
    assert dict(result.current_outcomes) == {
        "allow": 39,
        "require_approval tier 2": 4,
        "require_approval tier 1": 1,
        "defer": 1,
    }
    assert dict(result.draft_outcomes) == {
        "require_approval tier 1": 41,
        "require_approval tier 2": 1,
        "allow": 2,
        "defer": 1,
    }
    assert result.rules == {
        "default": RuleCount(current=39, draft=2),
        "refund-after-hours": RuleCount(current=1, draft=1),
        "refund-tier-1": RuleCount(current=1, draft=41),
        "refund-tier-2": RuleCount(current=3, draft=0),
        "window:customer_hours": RuleCount(current=1, draft=1),
    }
    # The 30.00 refund recorded as an approval is allowed by v1 today.
    assert result.recorded_differs == 1


def test_no_change_is_said_in_words() -> None:
    current = compile_policy(policy_source_parse(DEMO_TEXT), version=1)
    result = policy_simulate(current, current, history()[:5])
    assert result.changed == 0
    assert result.sentences() == [
        "No change: the draft decides all 5 recorded actions as the current version does."
    ]


def test_verdicts_name_tier_and_quorum() -> None:
    assert str(Verdict("require_approval", 3, 2)) == "require_approval tier 3 quorum 2"
    assert (
        Verdict("require_approval", 3, 2).would() == "would require a tier-3 approval from 2 people"
    )
    assert Verdict("deny").was() == "were denied"


def test_one_changed_action_reads_in_the_singular() -> None:
    change = Change(
        Verdict("allow"),
        Verdict("require_approval", 1, 1),
        count=1,
        by_action=Counter({"agent:refund_executor": 1}),
        by_rule=Counter({"refund-tier-1": 1}),
    )
    assert change.sentence() == (
        "1 agent:refund_executor action that was allowed would require a tier-1 approval "
        "(rule refund-tier-1)"
    )
    assert Verdict("deny").was(one=True) == "was denied"
