"""Every recovery tier (orchestration/failures.py): pure functions, no database, no worker."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from orchestration import failures
from orchestration.definition import Degraded, Failure, Workflow
from orchestration.errors import (
    Code,
    ContractViolation,
    ErrorClass,
    PermanentError,
    PolicyDenied,
    TransientError,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


class Out(BaseModel):
    answer: str


def _log(*minutes_ago: float) -> list[dict[str, object]]:
    return [{"at": (NOW - timedelta(minutes=m)).isoformat(), "agent": "a"} for m in minutes_ago]


def _failed(
    error, failures_now: int, log, *, max_attempts: int = 3, within: timedelta = timedelta(hours=1)
):
    return failures.attempt_failed(
        error,
        failures=failures_now,
        max_attempts=max_attempts,
        attempts_log=log,
        now=NOW,
        retry_within=within,
        delay=1.0,
    )


def test_a_transient_failure_is_retried_while_attempts_remain() -> None:
    assert _failed(TransientError("flaky"), 1, _log(0)) == failures.Retry(1.0)
    assert _failed(TransientError("flaky"), 2, _log(1, 0)) == failures.Retry(1.0)


def test_the_last_attempt_gives_up_naming_the_bound() -> None:
    decision = _failed(TransientError("flaky", code="provider_timeout"), 3, _log(2, 1, 0))
    assert isinstance(decision, failures.GiveUp)
    assert decision.error.code == Code.MAX_ATTEMPTS
    assert decision.error.detail == {
        "bound": "max_attempts",
        "limit": 3,
        "last_error": "provider_timeout",
    }


def test_a_retry_past_the_retry_window_gives_up_even_with_attempts_left() -> None:
    decision = _failed(TransientError("slow"), 2, _log(59.99, 0), max_attempts=10)
    assert isinstance(decision, failures.GiveUp) and decision.error.code == Code.RETRY_WINDOW
    # The window runs from the first failure since the count was reset: older ones do not count.
    assert _failed(TransientError("slow"), 1, _log(600, 0), max_attempts=10) == failures.Retry(1.0)


def test_permanent_contract_and_policy_failures_are_not_retried() -> None:
    for error in (PermanentError("no"), ContractViolation("bad shape")):
        decision = _failed(error, 1, _log(0))
        assert decision == failures.GiveUp(error)


def test_backoff_has_full_jitter_under_a_cap() -> None:
    rng = random.Random(7)
    delays = [failures.retry_delay(n, base=0.5, cap=4.0, rng=rng) for n in range(1, 12)]
    assert all(
        0 <= d <= min(4.0, 0.5 * 2 ** (n - 1)) for n, d in zip(range(1, 12), delays, strict=True)
    )
    assert len(set(delays)) == len(delays)


def _node_wf(**node_kw) -> Workflow:
    wf = Workflow(
        f"tiers_{sorted(node_kw)}",
        input=BaseModel,
        on_failure=node_kw.pop("wf_on_failure", "escalate"),
    )
    wf.agent("work", "primary", **node_kw)
    return wf.seal()


def _exhausted(wf: Workflow, *, tried=("primary",), compensation=False, error=None):
    error = error or TransientError("down")
    failure = Failure(
        step_key="work",
        agent=tried[-1],
        code=error.code,
        message=error.message,
        error_class=str(error.error_class),
        attempts=3,
        agents_tried=tuple(tried),
    )
    return failures.exhausted(
        wf,
        wf.node("work"),
        compensation=compensation,
        failure=failure,
        tried=list(tried),
        contract=Out,
        error=error,
    )


def test_tier_two_is_the_fallback_agent_once() -> None:
    wf = _node_wf(fallback="backup", degraded=Degraded(output={"answer": "none"}))
    assert _exhausted(wf) == failures.FallBack("backup")
    # The fallback failed too: the next tier, never the fallback again.
    assert isinstance(_exhausted(wf, tried=("primary", "backup")), failures.Degrade)


def test_tier_three_is_the_declared_degraded_result_checked_against_the_contract() -> None:
    wf = _node_wf(
        degraded=Degraded(
            output=lambda f: {"answer": f"unknown after {f.code}"}, reason="no answer"
        )
    )
    decision = _exhausted(wf, error=TransientError("down", code="provider_timeout"))
    assert decision == failures.Degrade(
        {"answer": "unknown after provider_timeout"}, "no answer (after provider_timeout)"
    )


def test_a_degraded_result_that_breaks_the_contract_escalates_instead() -> None:
    wf = _node_wf(degraded=Degraded(output={"wrong": 1}))
    decision = _exhausted(wf)
    assert isinstance(decision, failures.Escalate) and decision.error.code == Code.DEGRADED_CONTRACT
    assert decision.error.error_class == ErrorClass.CONTRACT


def test_tier_four_escalates_by_default_or_fails_the_run_when_declared() -> None:
    assert isinstance(_exhausted(_node_wf()), failures.Escalate)
    assert isinstance(_exhausted(_node_wf(on_failure="fail")), failures.FailRun)


def test_a_compensation_always_escalates() -> None:
    wf = _node_wf(fallback="backup", on_failure="fail", degraded=Degraded(output={"answer": "x"}))
    assert isinstance(_exhausted(wf, compensation=True), failures.Escalate)


def test_an_escalation_says_why_in_a_few_words() -> None:
    assert (
        failures.escalation_why(TransientError("x", code=Code.MAX_ATTEMPTS)) == "retries exhausted"
    )
    assert failures.escalation_why(ContractViolation("x")) == "contract violation"
    assert failures.escalation_why(PermanentError("x")) == "permanent error"
    # A cost ceiling is a policy's refusal by class, but the home page counts it as a limit hit.
    ceiling = PolicyDenied("x", code=Code.CEILING_EXCEEDED)
    assert failures.escalation_why(ceiling) == "limit reached (cost ceiling)"
    assert failures.escalation_why(PolicyDenied("x")) == "policy error"


def test_the_escalation_context_carries_every_attempt_and_the_skip_contract() -> None:
    wf = _node_wf(fallback="backup")
    context = failures.escalation_context(
        step_key="work",
        node=wf.node("work"),
        kind="agent",
        agent="backup",
        compensation=False,
        tried=failures.agents_tried(_log(2, 1), "backup"),
        error=TransientError("down"),
        attempts=_log(2, 1),
        tool_calls=[{"capability": "x"}] * 80,
        step_input={"q": "x" * 10_000},
        payload=None,
        contract=Out,
    )
    assert context["agents_tried"] == ["a", "backup"]
    assert len(context["tool_calls"]) == failures.ESCALATION_TOOL_CALLS
    assert context["input"]["truncated"] is True  # big inputs are cut, with their size
    assert context["skip_contract"] == "Out" and context["skip_schema"]["required"] == ["answer"]
    assert context["actions"] == ["retry", "skip", "abort"]


def test_a_lost_worker_counts_as_a_transient_failure() -> None:
    error = failures.lease_expired_error("host:1:2")
    assert error.error_class == ErrorClass.TRANSIENT and error.code == Code.LEASE_EXPIRED
    assert failures.lease_exhausted_error(3, 3).detail["last_error"] == "lease_expired"
