"""Reading a policy source (policies/source.py, policies/located.py): a document with an error
is never returned, and every error names the field and the line where it is, in YAML and in
JSON; the canonical rendering reads back as the same document."""

from __future__ import annotations

import json
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from policies.document import PolicyDocument
from policies.source import (
    PolicySourceError,
    SourceProblem,
    policy_source_parse,
    policy_source_problems,
    policy_source_render,
)

DEMO = Path(__file__).resolve().parents[2] / "policies" / "demo_policy.yaml"


def problems(text: str, **options: str) -> list[str]:
    """The problems of a source as ``line N: path: message`` strings (it must have some)."""
    source = textwrap.dedent(text).lstrip("\n")
    with pytest.raises(PolicySourceError) as raised:
        policy_source_parse(source, **options)  # type: ignore[arg-type]
    assert policy_source_problems(source, **options) == raised.value.problems  # type: ignore[arg-type]
    return [str(problem) for problem in raised.value.problems]


VALID_RULE = """
default: allow
rules:
  - id: big-refunds
    description: Big refunds need a person
    action: agent:refund_executor
    when:
      - {fact: params.proposal.amount, op: ">", value: 1000}
    outcome:
      decision: require_approval
      tier: 2
"""


def test_a_valid_source_parses() -> None:
    document = policy_source_parse(textwrap.dedent(VALID_RULE))
    assert document.rules[0].when[0].value == 1000  # type: ignore[union-attr]
    assert policy_source_problems(textwrap.dedent(VALID_RULE)) == []


def test_a_bad_tier_is_reported_at_its_line() -> None:
    assert problems(VALID_RULE.replace("tier: 2", "tier: 4")) == [
        "line 10: rules[0].outcome.tier: must be 1, 2 or 3"
    ]


def test_the_problem_carries_line_column_and_path_for_an_editor() -> None:
    source = textwrap.dedent(VALID_RULE.replace("tier: 2", "tier: 4")).lstrip("\n")
    [problem] = policy_source_problems(source)
    assert problem == SourceProblem(10, 13, "rules[0].outcome.tier", "must be 1, 2 or 3")
    assert problem.to_json() == {
        "line": 10,
        "column": 13,
        "path": "rules[0].outcome.tier",
        "message": "must be 1, 2 or 3",
    }


def test_an_unknown_field_is_refused_with_a_suggestion() -> None:
    assert problems(VALID_RULE.replace("    description:", "    descripton:")) == [
        "line 3: rules[0].description: required",
        "line 4: rules[0].descripton: unknown field (did you mean 'description'?)",
    ]


def test_a_missing_default_is_reported_at_the_top() -> None:
    assert problems("rules: []\n") == ["line 1: default: required"]


def test_a_rule_naming_a_window_or_allowlist_that_does_not_exist() -> None:
    text = """
    default: deny
    allowlists:
      domains: {kind: domains, entries: [example.com]}
    rules:
      - id: mail
        description: Mail outside the list
        action: tool:send_email
        when:
          - {fact: params.to, op: not_in_allowlist, allowlist: domain}
          - {window: office}
        outcome: {decision: defer, until: office}
    """
    assert problems(text) == [
        "line 9: rules[0].when[0].allowlist: no allowlist is called 'domain' (defined: domains)",
        "line 10: rules[0].when[1].window: no time window is called 'office' (defined: none is defined)",
        "line 11: rules[0].outcome.until: no time window is called 'office' (defined: none is defined)",
    ]


def test_a_rule_id_used_twice() -> None:
    text = VALID_RULE + textwrap.dedent("""
      - id: big-refunds
        description: Again
        action: tool:issue_refund
        outcome: {decision: allow}
    """).replace("\n", "\n  ")
    assert problems(text) == [
        "line 12: rules[1].id: rule id 'big-refunds' is already used by rules[0]"
    ]


def test_an_unknown_decision() -> None:
    assert problems(VALID_RULE.replace("decision: require_approval", "decision: escalate")) == [
        "line 9: rules[0].outcome.decision: must be one of allow, deny, require_approval, defer (got 'escalate')"
    ]


def test_cross_field_problems_point_at_the_field() -> None:
    text = """
    default: allow
    rules:
      - id: a
        description: A
        action: tool:pay
        when:
          - fact: params.amount
            op: ">"
            value: lots
        outcome: {decision: require_approval, tier: 2, stages: [2, 3]}
      - id: b
        description: B
        action: tool:pay
        outcome: {decision: require_approval, stages: [3, 2]}
    """
    assert problems(text) == [
        "line 9: rules[0].when[0].value: op > needs a number",
        "line 10: rules[0].outcome: give either tier (1, 2 or 3) or stages (e.g. [2, 3]), not both",
        "line 14: rules[1].outcome.stages: stages must rise, e.g. [2, 3]: each stage a higher tier",
    ]


def test_value_problems_in_every_section() -> None:
    text = """
    default: allow
    currency: euro
    rules:
      - id: Bad Id
        description: x
        action: send_email
        when: [{fact: price, op: ">", value: 1}]
        outcome: {decision: deny}
    time_windows:
      office: {days: [mon-fry], start: "25:00", end: "18:00", zone: Mars/Base}
    allowlists:
      domains: {kind: domains, entries: [Example.COM]}
    ceilings:
      - {scope: weekly, limit: 5}
      - {scope: workflow_day, limit: "1,000"}
      - {scope: global_day, key: x, limit: 5}
    rate_limits:
      - {id: r, action: tool:x, limit: 0, period: 1 minute}
    bounds:
      refund_desk: {max_retries: -1}
    """
    assert problems(text) == [
        "line 2: currency: must be a three-letter currency code such as USD or EUR",
        "line 4: rules[0].id: must be 1-64 characters: lower-case letters, digits, '-', '_' or '.', starting with a letter or a digit",
        "line 6: rules[0].action: 'send_email' must start with 'agent:' or 'tool:' (e.g. 'tool:send_email', 'agent:*')",
        "line 7: rules[0].when[0].fact: unknown fact 'price': a fact is params.<path>, spend.<scope> or one of action, kind, workflow, node, tenant, agent, run_id",
        "line 8: rules[0].outcome.reason: required",
        "line 10: time_windows.office.days: 'mon-fry' is not a day or a range of days (mon, tue, ..., sun; mon-fri)",
        "line 10: time_windows.office.start: must be a local time 'HH:MM' from 00:00 to 24:00, e.g. '08:00'",
        "line 10: time_windows.office.zone: 'Mars/Base' is not a time zone: use an IANA name such as 'Europe/Berlin', or 'tenant'",
        "line 12: allowlists.domains.entries[0]: 'Example.COM' is not a lower-case domain (example.com, *.example.com)",
        "line 14: ceilings[0].scope: must be run, workflow_day, agent_day, tenant_month or global_day",
        "line 15: ceilings[1].limit: must be an amount of money, e.g. 50.00",
        "line 16: ceilings[2].key: global_day covers everything: it has no key",
        "line 18: rate_limits[0].limit: must be greater than or equal to 1",
        "line 18: rate_limits[0].period: must be a duration such as '90s', '30m', '8h', '2d' or '1h30m'",
        "line 20: bounds.refund_desk.max_retries: must be greater than or equal to 0",
    ]


def test_a_bad_name_as_a_key() -> None:
    assert problems("default: allow\nallowlists:\n  Bad Name: {kind: values, entries: []}\n") == [
        "line 3: allowlists[\"Bad Name\"]: the name 'Bad Name' must be 1-64 characters: lower-case letters, "
        "digits, '-', '_' or '.', starting with a letter or a digit"
    ]


def test_yaml_syntax_errors_and_duplicate_keys_have_a_line() -> None:
    assert problems("default: allow\nrules:\n  - id: a\n   description: b\n") == [
        "line 4: not valid YAML: the indentation does not line up with the lines above"
    ]
    assert problems("default: allow\n\tx: 1\n") == [
        "line 2: not valid YAML: a tab: indent with spaces"
    ]
    assert problems("default: allow\nrules: [a, b\n") == [
        "line 3: not valid YAML: a '[' list is not closed with ']'"
    ]
    assert problems("default: allow\ndefault: deny\n") == [
        "line 2: default: duplicate key 'default'"
    ]
    assert problems("default: allow\n---\ndefault: deny\n") == [
        "line 2: one document expected, found several (remove the '---' separators)"
    ]
    assert problems("") == [
        "line 1: the document is empty: it needs at least 'default: allow' or 'default: deny'"
    ]
    assert problems("- a\n- b\n")[0].startswith("line 1: the document is a list")


def test_yaml_aliases_cannot_expand_without_limit() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        for prev, name in zip("abcdef", "bcdefg", strict=True)
    )
    assert "more than 200000 values" in problems(bomb)[0]


def test_yaml_1_1_surprises_are_read_as_an_admin_means_them() -> None:
    text = """
    default: allow
    time_windows:
      evening: {days: [mon], start: 18:00, end: 20:00, zone: UTC}
    rules:
      - id: flag
        description: Flags
        action: tool:x
        when:
          - {fact: params.answer, op: ==, value: no}
          - {fact: params.count, op: ">", value: 10_000}
          - {fact: params.price, op: ">", value: 0.10}
        outcome: {decision: allow}
    """
    document = policy_source_parse(textwrap.dedent(text))
    window = document.time_windows["evening"]
    assert (window.start, window.end) == ("18:00", "20:00")  # YAML 1.1 would read 20:00 as 1200
    values = [condition.value for condition in document.rules[0].when]  # type: ignore[union-attr]
    assert values == ["no", 10000, Decimal("0.10")]
    assert isinstance(values[2], Decimal)


def test_json_errors_have_a_line_and_column() -> None:
    assert problems('{"default": "allow",\n "rules": [],\n}') == [
        "line 3: not valid JSON: Expecting property name enclosed in double quotes"
    ]
    [problem] = policy_source_problems('{"default": "allow",\n "rules": [],\n}')
    assert (problem.line, problem.column) == (3, 1)
    source = json.dumps(
        {
            "default": "allow",
            "rules": [
                {
                    "id": "a",
                    "description": "A",
                    "action": "tool:x",
                    "outcome": {"decision": "require_approval", "tier": 9},
                }
            ],
        },
        indent=2,
    )
    assert problems(source) == ["line 10: rules[0].outcome.tier: must be 1, 2 or 3"]
    assert problems('{"default": "allow", "default": "deny"}') == [
        "line 1: default: duplicate key 'default'"
    ]
    assert problems('{\n  "default": "allow",\n  "bogus": 1\n}') == ["line 3: bogus: unknown field"]


def test_json_numbers_stay_exact() -> None:
    source = '{"default": "deny", "ceilings": [{"scope": "run", "limit": 0.10}], "prices": {"m": {"input_per_1k": 0.00015, "output_per_1k": "0.0006"}}}'
    document = policy_source_parse(source)
    assert document.ceilings[0].limit == Decimal("0.10")
    assert document.prices["m"].input_per_1k == Decimal("0.00015")


def test_a_json_source_need_not_start_with_a_brace_if_the_format_is_given() -> None:
    assert problems("  []", format="json") == [
        "line 1: the document is a list, not a mapping: it needs at least 'default: allow' or 'default: deny'"
    ]


def test_the_demo_policy_reads_and_renders_back_to_the_same_document() -> None:
    document = policy_source_parse(DEMO.read_text())
    rendered = policy_source_render(document)
    assert policy_source_parse(rendered) == document
    assert policy_source_render(policy_source_parse(rendered)) == rendered
    # Stored as JSON (PolicyVersion.document) and read back.
    stored = json.loads(json.dumps(document.to_json()))
    assert PolicyDocument.model_validate(stored) == document
    assert policy_source_parse(json.dumps(stored)) == document


def test_the_canonical_rendering_quotes_only_what_would_read_back_otherwise() -> None:
    document = policy_source_parse(
        textwrap.dedent("""
        default: allow
        description: "true"
        rules:
          - id: r
            description: "10"
            action: tool:x
            when: [{fact: params.code, op: in, value: ["007", "yes", 7, "1e3", "08:00"]}]
            outcome: {decision: allow}
    """)
    )
    rendered = policy_source_render(document)
    assert "description: 'true'" in rendered
    assert "description: '10'" in rendered
    assert "['007', yes, 7, '1e3', '08:00']" in rendered
    assert policy_source_parse(rendered) == document


def test_the_json_schema_describes_the_demo_policy() -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schema = PolicyDocument.model_json_schema()
    validator = jsonschema_rs.validator_for(schema)
    demo = policy_source_parse(DEMO.read_text()).to_json()
    assert validator.is_valid(demo)
    assert not validator.is_valid({**demo, "rules": [{"id": "x"}]})
    assert not validator.is_valid({**demo, "surprise": 1})
