"""The pieces of the decision benchmark (``python -m tests.bench.policy_decisions``, issue 18:
p99 at most 0.1 ms with 100 rules): its policies have the rule counts it reports, its traffic
is the realistic mix it claims, its 100-rule policy decides every kind of action, and a guard
that a decision's CPU p99 at 100 rules stays far from a millisecond (the benchmark itself
measures the figure that is reported; this catches a regression of an order of magnitude in
every test run, on any machine load, by the thread's own CPU clock)."""

from __future__ import annotations

import time
from collections import Counter

from policies.evaluate import compile_policy, policy_decide
from tests.bench.policy_decisions import demo_padded, measure, one_action_worst_case, traffic

#: Five times the issue's target: a guard, not the measurement.
GUARD_P99_MICROSECONDS = 500


def test_the_benchmark_policies_have_the_rule_counts_it_reports() -> None:
    for rules, document in (
        (10, demo_padded(10)),
        (100, demo_padded(100)),
        (100, one_action_worst_case(100)),
    ):
        assert len(compile_policy(document, version=1).rules) == rules


def test_the_traffic_mixes_every_kind_of_action_the_demo_policy_decides() -> None:
    kinds = Counter(
        facts.action.split(":")[1] if facts.action.startswith("agent:") else facts.action
        for facts, _ in traffic(2_000)
    )
    assert {"refund_executor", "customer_notifier", "tool:send_email", "tool:issue_refund"} <= set(
        kinds
    )
    assert len(kinds) >= 10 and min(kinds["refund_executor"], kinds["tool:send_email"]) >= 50


def test_a_100_rule_decision_is_far_below_a_millisecond_of_cpu() -> None:
    policy = compile_policy(demo_padded(100), version=1)
    mix = traffic(1_000)
    outcomes = Counter(policy_decide(policy, facts, now).outcome for facts, now in mix)
    assert {"allow", "require_approval", "defer"} <= set(outcomes)  # the rules are exercised
    result = measure(
        lambda facts, now: policy_decide(policy, facts, now), mix, 5_000, time.thread_time_ns
    )
    assert 0 < result["p99"] < GUARD_P99_MICROSECONDS, result
