"""The diff between two policy documents (policies/diff.py): changes in words by rule id and by
section, and a unified diff of the canonical sources."""

from __future__ import annotations

from pathlib import Path

from policies.diff import policy_diff
from policies.source import policy_source_parse

DEMO_TEXT = (Path(__file__).resolve().parents[2] / "policies" / "demo_policy.yaml").read_text()


def edited(*replacements: tuple[str, str]) -> str:
    text = DEMO_TEXT
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def test_identical_documents_have_no_changes() -> None:
    document = policy_source_parse(DEMO_TEXT)
    diff = policy_diff(document, policy_source_parse(DEMO_TEXT))
    assert diff.unchanged and diff.changes == () and diff.unified == ""


def test_the_changes_read_in_words() -> None:
    old = policy_source_parse(DEMO_TEXT)
    new = policy_source_parse(
        edited(
            ("default: allow", "default: deny"),
            (
                "outcome: {decision: require_approval, tier: 2, sla: 8h}",
                "outcome: {decision: require_approval, tier: 3, sla: 8h}",
            ),
            ('op: ">", value: 10000}', 'op: ">", value: 20000}'),
            (
                "{decision: require_approval, tier: 1, sla: 4h}",
                "{decision: deny, reason: no outside email}",
            ),
            ('end: "20:00"', 'end: "21:00"'),
            ("entries: [example.com, example.org", "entries: [example.com, example.io"),
            ("key: refund_desk, limit: 0.05", "key: refund_desk, limit: 2.50"),
            ("    limit: 30\n", "    limit: 20\n"),
            ("refund_desk: {max_retries: 2}", "refund_desk: {max_retries: 3}"),
            (
                "  - id: refund-currency\n",
                "  - id: classifier-off\n    description: No classifying\n    action: agent:classifier\n"
                "    outcome: {decision: deny, reason: switched off}\n\n  - id: refund-currency-gone\n",
            ),
        )
    )
    diff = policy_diff(old, new, old_label="v1", new_label="v2")
    assert diff.changes == (
        "default: allow -> deny",
        "rule refund-currency removed (was: [agent:refund_executor, tool:issue_refund] when "
        "params.proposal.currency or params.currency not_in [EUR, USD, GBP]: deny (refunds are paid in EUR, USD or GBP only))",
        "rule refund-tier-2: tier 2 -> 3",
        "rule refund-tier-3: condition params.proposal.amount or params.amount > 10000 -> params.proposal.amount or params.amount > 20000",
        "rule email-outside-allowlist: outcome require_approval tier 1, sla 4h -> deny (no outside email)",
        "rule classifier-off added: agent:classifier: deny (switched off)",
        "rule refund-currency-gone added: [agent:refund_executor, tool:issue_refund] when "
        "params.proposal.currency or params.currency not_in [EUR, USD, GBP]: deny (refunds are paid in EUR, USD or GBP only)",
        "window customer_hours: end 20:00 -> 21:00",
        "allowlist customer_domains: added example.io; removed example.org",
        "ceiling workflow_day refund_desk: limit 0.05 -> 2.50",
        "rate limit email-per-tenant: limit 30 -> 20",
        "bounds refund_desk: max_retries 2 -> 3",
    )
    assert diff.unified.startswith("--- v1\n+++ v2\n")
    assert "-      tier: 2\n" in diff.unified and "+      tier: 3\n" in diff.unified


def test_sections_added_removed_and_reordered() -> None:
    old = policy_source_parse(
        """
default: allow
rules:
  - {id: a, description: A, action: tool:a, outcome: {decision: allow}}
  - {id: b, description: B, action: tool:b, outcome: {decision: allow}}
time_windows:
  office: {days: [mon-fri], start: "09:00", end: "17:00", zone: UTC}
ceilings:
  - {scope: run, limit: 1}
prices:
  m: {input_per_1k: 0.1, output_per_1k: 0.2}
"""
    )
    new = policy_source_parse(
        """
default: allow
rules:
  - {id: b, description: B, action: tool:b, workflow: refunds, outcome: {decision: allow}}
  - {id: a, description: A, action: tool:a, outcome: {decision: require_approval, stages: [2, 3], quorum: 2}}
time_windows:
  office: {days: [mon-sat], start: "09:00", end: "17:00", zone: Europe/Berlin}
ceilings:
  - {scope: run, limit: 1, soft_ratio: 0.9}
  - {scope: global_day, limit: 100}
prices:
  m: {input_per_1k: 0.1, output_per_1k: 0.25}
  n: {input_per_1k: 1, output_per_1k: 2}
"""
    )
    assert policy_diff(old, new).changes == (
        "rule b: workflow (none) -> [refunds]",
        "rule a: outcome allow -> require_approval stages 2 then 3, quorum 2, sla 1d",
        "rules reordered: a, b -> b, a",
        "window office: days mon-fri -> mon-sat",
        "window office: zone UTC -> Europe/Berlin",
        "ceiling run (each): soft_ratio 0.8 -> 0.9",
        "ceiling global_day added: limit 100, soft_ratio 0.8",
        "price m: output_per_1k 0.2 -> 0.25",
        "price n added: input_per_1k 1, output_per_1k 2",
    )
