"""A provider's circuit shared by processes: it opens after the threshold, calls fail fast while
it is open, exactly one probe goes through after the cool-down even when two worker processes
race for it, and the probe's success closes it. Real time, real Redis, real processes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest

from audit.verbs import Verb
from orchestration.tools.client import ToolCallFailedTransient, ToolClient
from orchestration.tools.limits import CLOSED, HALF_OPEN, OPEN, breaker
from orchestration.tools.providers import BreakerPolicy, HttpJsonProvider
from orchestration.tools.registry import RetryPolicy
from tests.support.stub_provider import (
    StubProvider,
    StubReply,
    call_once_when_told,
    echo_capability,
)

COOLDOWN = 1.0
POLICY = BreakerPolicy(failure_rate=0.5, min_calls=4, window_seconds=30, cooldown_seconds=COOLDOWN)
ONE_ATTEMPT = RetryPolicy(max_attempts=1, time_budget_seconds=10)


def test_the_circuit_opens_fails_fast_lets_one_probe_through_and_closes(
    stubs: Callable[[str], StubProvider],
    provider_name: Callable[[str], str],
    spawn: Callable[..., Any],
) -> None:
    stub = stubs("fragile")
    provider = HttpJsonProvider(
        name=provider_name("fragile"), url=stub.url, breaker=POLICY, timeout_seconds=5
    )
    capability = echo_capability("lookup", provider, retry=ONE_ATTEMPT)
    client = ToolClient()

    # Four failures out of four calls: the threshold (50 % of at least 4) is reached.
    stub.default = StubReply(status=503)
    for _ in range(4):
        with pytest.raises(ToolCallFailedTransient):
            client.call(capability, {"text": "q"})
    assert [
        (t.from_state, t.to_state, t.calls, t.failures) for t in client.circuit_transitions
    ] == [(CLOSED, OPEN, 4, 4)]
    assert breaker.state(provider).state == OPEN

    # While open: fail fast, without a request.
    with pytest.raises(ToolCallFailedTransient) as caught:
        client.call(capability, {"text": "q"})
    assert caught.value.detail["attempts"] == [
        {
            "provider": provider.name,
            "attempt": 1,
            "status": "skipped",
            "error_class": "transient",
            "error_code": "circuit_open",
            "latency_ms": 0,
            "retry_delay_ms": None,
        }
    ]
    assert stub.count == 4

    # Two processes race for the probe once the cool-down is over; the probe is slow to answer.
    stub.default = StubReply(status=200, delay_seconds=0.5)
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    for _ in range(2):
        spawn(call_once_when_told, capability, {"text": "probe"}, go, out)
    assert [out.get(timeout=60)[0] for _ in range(2)] == ["ready", "ready"]
    time.sleep(max(0.0, (breaker.state(provider).probe_after or 0) - time.time()) + 0.05)

    go.set()
    outcomes = sorted(out.get(timeout=30) for _ in range(2))

    assert outcomes == [("failed", "circuit_open"), ("ok", stub.name)]
    assert stub.count == 5  # exactly one probe reached the provider
    assert breaker.state(provider).state == CLOSED

    # Closed again: calls go through.
    client.call(capability, {"text": "after"})
    assert stub.count == 6


def test_a_failed_probe_opens_the_circuit_for_another_cool_down(
    stubs: Callable[[str], StubProvider], provider_name: Callable[[str], str]
) -> None:
    stub = stubs("fragile")
    stub.default = StubReply(status=503)
    provider = HttpJsonProvider(name=provider_name("fragile"), url=stub.url, breaker=POLICY)
    capability = echo_capability("lookup", provider, retry=ONE_ATTEMPT)
    client = ToolClient()
    for _ in range(4):
        with pytest.raises(ToolCallFailedTransient):
            client.call(capability, {"text": "q"})
    time.sleep(COOLDOWN + 0.05)

    with pytest.raises(ToolCallFailedTransient):
        client.call(capability, {"text": "probe"})

    assert stub.count == 5
    assert [(t.from_state, t.to_state) for t in client.circuit_transitions] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
    ]
    assert breaker.state(provider).state == OPEN
    verbs = [e.verb for e in client.audit_entries if e.object_id == provider.name]
    assert [v for v in verbs if v >= Verb.TOOL_CIRCUIT_OPENED] == [
        Verb.TOOL_CIRCUIT_OPENED,
        Verb.TOOL_CIRCUIT_HALF_OPENED,
        Verb.TOOL_CIRCUIT_OPENED,
    ]
