"""The call path against local stub providers: retries with jittered backoff, fallover, what is
not retried, idempotency keys, redaction, budgets, and what is recorded."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.errors import ContractViolation, ErrorClass, PermanentError, TransientError
from orchestration.models import ToolCall
from orchestration.tools.client import (
    ToolCallFailed,
    ToolCallFailedPermanent,
    ToolCallFailedTransient,
    ToolClient,
    tool_calls_save,
    tool_idempotency_key,
)
from orchestration.tools.limits import OPEN, breaker
from orchestration.tools.providers import BreakerPolicy, HttpJsonProvider, RateLimit
from orchestration.tools.registry import Capability, RetryPolicy
from tests.support.stub_provider import EchoResult, StubProvider, StubReply, echo_capability
from tests.tools.conftest import FakeClock

#: These tests are about retries, not circuits: the breaker never opens here.
PATIENT = BreakerPolicy(min_calls=10_000)
RETRY = RetryPolicy(max_attempts=3, base_seconds=0.2, max_delay_seconds=5.0, time_budget_seconds=60)

Names = Callable[[str], str]
Stubs = Callable[[str], StubProvider]


def http(stub: StubProvider, name: str, **kwargs: Any) -> HttpJsonProvider:
    kwargs.setdefault("breaker", PATIENT)
    kwargs.setdefault("timeout_seconds", 2.0)
    return HttpJsonProvider(name=name, url=stub.url, **kwargs)


def attempts_of(client: ToolClient) -> list[tuple[str, int, str, str]]:
    return [(r.provider, r.attempt, r.status, r.error_code) for r in client.records]


# --- retry, backoff, fallover -------------------------------------------------------------------


def test_429_is_retried_with_growing_jittered_delays_then_the_next_provider_serves(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    throttled, backup = stubs("throttled"), stubs("backup")
    first = http(throttled, provider_name("throttled"), priority=1)
    second = http(backup, provider_name("backup"), priority=2)
    capability = echo_capability("search", second, first, retry=RETRY)
    throttled.default = StubReply(status=429)
    delays: list[list[float]] = []

    for call_index in range(6):
        client = ToolClient(clock=clock, rng=random.Random(call_index))
        clock.sleeps.clear()
        result = client.call(capability, {"text": "q"}, call_index=call_index)

        assert isinstance(result, EchoResult) and result.served_by == "backup"
        assert attempts_of(client) == [
            (first.name, 1, "failed", "provider_throttled"),
            (first.name, 2, "failed", "provider_throttled"),
            (first.name, 3, "failed", "provider_throttled"),
            (second.name, 1, "succeeded", ""),
        ]
        recorded = [r.retry_delay_ms for r in client.records]
        assert recorded == [round(s * 1000) for s in clock.sleeps] + [None, None]
        delays.append(clock.sleeps[:])

    assert throttled.count == 18 and backup.count == 6
    bounds = [RETRY.delay_bound(1), RETRY.delay_bound(2)]
    assert bounds[0] < bounds[1]
    for first_delay, second_delay in delays:
        assert 0 <= first_delay <= bounds[0] and 0 <= second_delay <= bounds[1]
    # Full jitter: the delays vary from call to call; the second ones range over a wider bound.
    assert len({round(d[0], 6) for d in delays}) == len(delays)
    assert len({round(d[1], 6) for d in delays}) == len(delays)
    assert max(d[1] for d in delays) > bounds[0]


def test_retry_after_is_honoured_up_to_the_cap(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    stub = stubs("slow-down")
    stub.queue(StubReply(status=429, headers={"Retry-After": "3"}))
    capability = echo_capability("search", http(stub, provider_name("slow-down")), retry=RETRY)

    ToolClient(clock=clock).call(capability, {"text": "q"})

    assert len(clock.sleeps) == 1 and 3.0 <= clock.sleeps[0] <= RETRY.max_delay_seconds


def test_5xx_then_success_on_the_same_provider(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    stub = stubs("flaky")
    stub.reply_with(503, 502)
    provider = http(stub, provider_name("flaky"))
    client = ToolClient(clock=clock)

    client.call(echo_capability("search", provider, retry=RETRY), {"text": "q"})

    assert [r.status for r in client.records] == ["failed", "failed", "succeeded"]
    assert stub.count == 3


def test_a_timeout_is_transient(stubs: Stubs, provider_name: Names) -> None:
    stub = stubs("sluggish")
    stub.default = StubReply(delay_seconds=0.5)
    provider = http(stub, provider_name("sluggish"), timeout_seconds=0.1)
    retry = RetryPolicy(max_attempts=2, base_seconds=0.01, time_budget_seconds=5)

    with pytest.raises(ToolCallFailedTransient) as caught:
        ToolClient().call(echo_capability("search", provider, retry=retry), {"text": "q"})

    assert [a["error_code"] for a in caught.value.detail["attempts"]] == ["provider_timeout"] * 2


def test_an_unreachable_provider_is_transient_and_the_next_one_serves(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    gone = HttpJsonProvider(
        name=provider_name("gone"),
        url=f"http://127.0.0.1:{closed_port}/",
        priority=1,
        breaker=PATIENT,
    )
    backup = http(stubs("backup"), provider_name("backup"), priority=2)
    client = ToolClient(clock=clock)

    client.call(echo_capability("search", gone, backup, retry=RETRY), {"text": "q"})

    assert [r.error_code for r in client.records] == ["connection_error"] * 3 + [""]


# --- not retried --------------------------------------------------------------------------------


def test_a_permanent_error_is_not_retried_nor_sent_elsewhere(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    refusing, backup = stubs("refusing"), stubs("backup")
    refusing.default = StubReply(status=400, body={"error": "no such field"})
    capability = echo_capability(
        "search",
        http(refusing, provider_name("refusing"), priority=1),
        http(backup, provider_name("backup"), priority=2),
        retry=RETRY,
    )
    client = ToolClient(clock=clock)

    with pytest.raises(ToolCallFailedPermanent) as caught:
        client.call(capability, {"text": "q"})

    assert refusing.count == 1 and backup.count == 0 and clock.sleeps == []
    error = caught.value
    assert isinstance(error, PermanentError) and error.code == "tool_call_failed"
    assert error.error_class == ErrorClass.PERMANENT
    assert error.detail["last_error"]["code"] == "provider_rejected"
    assert [a["error_code"] for a in error.detail["attempts"]] == ["provider_rejected"]
    assert "no such field" in client.records[0].error_message


def test_a_result_contract_violation_is_not_retried(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    broken = stubs("broken")
    broken.default = StubReply(body={"served_by": 42})
    client = ToolClient(clock=clock)

    with pytest.raises(ToolCallFailedPermanent) as caught:
        client.call(
            echo_capability("search", http(broken, provider_name("broken")), retry=RETRY),
            {"text": "q"},
        )

    assert broken.count == 1 and clock.sleeps == []
    assert caught.value.error_class == ErrorClass.CONTRACT
    assert client.records[0].error_code == "result_contract"
    assert client.records[0].result_summary == ""


def test_a_broken_provider_leaves_the_call_to_the_next_one(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    broken, backup = stubs("broken"), stubs("backup")
    broken.default = StubReply(body=b"<html>oops</html>")
    client = ToolClient(clock=clock)
    capability = echo_capability(
        "search",
        http(broken, provider_name("broken"), priority=1),
        http(backup, provider_name("backup"), priority=2),
        retry=RETRY,
    )

    result = client.call(capability, {"text": "q"})

    assert result.served_by == "backup"  # type: ignore[attr-defined]
    assert broken.count == 1 and [r.error_code for r in client.records] == ["result_contract", ""]


def test_bad_params_are_refused_before_any_call(stubs: Stubs, provider_name: Names) -> None:
    stub = stubs("never")
    client = ToolClient()

    with pytest.raises(ContractViolation) as caught:
        client.call(
            echo_capability("search", http(stub, provider_name("never"))),
            {"txt": "q", "card_number": "4111111111111111"},
        )

    assert caught.value.code == "tool_params_contract"
    assert "4111111111111111" not in json.dumps(caught.value.as_dict())
    assert stub.count == 0 and client.records == []


# --- idempotency --------------------------------------------------------------------------------


def test_a_side_effecting_call_keeps_its_key_across_retries(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    payments = stubs("payments")
    # The first request applies the effect, then the answer is lost in a 503.
    payments.queue(StubReply(status=503, applies_effect=True))
    capability = echo_capability(
        "refund", http(payments, provider_name("payments")), side_effects=True, retry=RETRY
    )
    client = ToolClient(clock=clock)

    client.call(capability, {"text": "refund 10"}, run_id=7, node="refund", call_index=0)

    expected = tool_idempotency_key(7, "refund", 0)
    assert [r.idempotency_key for r in payments.requests] == [expected, expected]
    assert payments.effects_applied == 1
    assert [r.idempotency_key for r in client.records] == [expected, expected]


def test_keys_differ_per_call_and_read_only_calls_carry_none(
    stubs: Stubs, provider_name: Names
) -> None:
    stub = stubs("mixed")
    provider = http(stub, provider_name("mixed"))
    client = ToolClient()

    client.call(
        echo_capability("refund", provider, side_effects=True),
        {"text": "a"},
        run_id=7,
        node="refund",
        call_index=0,
    )
    client.call(
        echo_capability("refund", provider, side_effects=True),
        {"text": "b"},
        run_id=7,
        node="refund",
        call_index=1,
    )
    client.call(
        echo_capability("refund", provider, side_effects=True),
        {"text": "c"},
        run_id=7,
        node="refund#2",
        call_index=0,
    )
    client.call(
        echo_capability("lookup", provider), {"text": "d"}, run_id=7, node="refund", call_index=0
    )

    keys = [r.idempotency_key for r in stub.requests]
    assert len(set(keys[:3])) == 3 and keys[3] == ""
    assert stub.effects_applied == 4


def test_a_side_effecting_call_needs_a_run_or_a_key(stubs: Stubs, provider_name: Names) -> None:
    stub = stubs("payments")
    capability = echo_capability("refund", http(stub, provider_name("payments")), side_effects=True)

    with pytest.raises(PermanentError) as caught:
        ToolClient().call(capability, {"text": "x"})
    ToolClient().call(capability, {"text": "x"}, idempotency_key="order-17-refund")

    assert caught.value.code == "idempotency_key_required"
    assert [r.idempotency_key for r in stub.requests] == ["order-17-refund"]


# --- secrets ------------------------------------------------------------------------------------

API_KEY = "sk-live-7d3c1fe5a5a624c2e3506"
CARD = "4111111111111111"
SESSION = "sess-b5fd92a911173e"


def test_secrets_never_reach_records_or_audit_data(
    stubs: Stubs, provider_name: Names, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaky, backup = stubs("leaky"), stubs("backup")
    monkeypatch.setenv("LEAKY_API_KEY", API_KEY)
    # A provider whose errors and results echo the request, headers included.
    leaky.queue(StubReply(status=500, echo_request=True))
    leaky.default = StubReply(status=401, echo_request=True)
    backup.default = StubReply(
        body={"served_by": "backup", "echo": {"card_number": CARD}, "session": SESSION},
        echo_request=True,
    )
    first = http(leaky, provider_name("leaky"), priority=1, api_key_env="LEAKY_API_KEY")
    second = http(backup, provider_name("backup"), priority=2, secret_fields=frozenset({"session"}))
    capability = echo_capability("pay", first, second, retry=RETRY)
    client = ToolClient(clock=clock)

    result = client.call(capability, {"text": f"charge card {CARD}", "card_number": CARD})

    # The key did reach the provider, and the agent gets its result unredacted.
    assert leaky.requests[0].headers["authorization"] == f"Bearer {API_KEY}"
    assert result.echo["card_number"] == CARD  # type: ignore[attr-defined]
    assert [r.error_code for r in client.records] == [
        "provider_error",
        "provider_permission_denied",
        "",
    ]
    fields = [f.attname for f in ToolCall._meta.concrete_fields]
    recorded = json.dumps(
        [{name: getattr(r, name) for name in fields} for r in client.records]
        + [{"data": e.data, "payload": e.payload} for e in client.audit_entries],
        default=str,
    )
    for secret in (API_KEY, CARD, SESSION):
        assert secret not in recorded
    assert client.records[0].params == {
        "text": "charge card [redacted]",
        "card_number": "[redacted]",
    }
    assert "[redacted]" in client.records[0].error_message
    assert '"session":"[redacted]"' in client.records[2].result_summary


def test_secrets_stay_out_of_the_failure_detail(
    stubs: Stubs, provider_name: Names, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = stubs("leaky")
    monkeypatch.setenv("LEAKY_API_KEY", API_KEY)
    stub.default = StubReply(status=400, echo_request=True)
    capability = echo_capability(
        "pay", http(stub, provider_name("leaky"), api_key_env="LEAKY_API_KEY"), retry=RETRY
    )

    with pytest.raises(ToolCallFailed) as caught:
        ToolClient(clock=clock).call(capability, {"text": "x", "card_number": CARD})

    text = json.dumps(caught.value.as_dict()) + str(caught.value)
    assert API_KEY not in text and CARD not in text


# --- circuit and rate limit in the call path ----------------------------------------------------


def test_an_open_circuit_fails_fast_and_the_next_provider_serves(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    down, backup = stubs("down"), stubs("backup")
    down.default = StubReply(status=503)
    policy = BreakerPolicy(failure_rate=0.5, min_calls=3, window_seconds=60, cooldown_seconds=30)
    first = http(down, provider_name("down"), priority=1, breaker=policy)
    capability = echo_capability(
        "search", first, http(backup, provider_name("backup"), priority=2), retry=RETRY
    )
    client = ToolClient(clock=clock)

    client.call(capability, {"text": "q"})  # three 503s open the circuit
    assert [t.to_state for t in client.circuit_transitions] == [OPEN]
    assert breaker.state(first).state == OPEN
    client.call(capability, {"text": "q"})

    assert down.count == 3
    assert attempts_of(client)[-2:] == [
        (first.name, 1, "skipped", "circuit_open"),
        (client.records[-1].provider, 1, "succeeded", ""),
    ]
    verbs = [e.verb for e in client.audit_entries]
    assert verbs.count(Verb.TOOL_CIRCUIT_OPENED) == 1 and Verb.TOOL_CALL_SKIPPED in verbs


def test_without_a_token_the_call_fails_rate_limited_and_is_retried(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    stub = stubs("metered")
    limit = RateLimit(per_second=1, burst=1, max_wait_seconds=0)
    retry = RetryPolicy(max_attempts=3, base_seconds=0.6, time_budget_seconds=60)
    provider = http(stub, provider_name("metered"), rate_limit=limit)
    capability = echo_capability("search", provider, retry=retry)
    client = ToolClient(clock=clock, rng=_Always(1.0))

    client.call(capability, {"text": "a"})
    client.call(capability, {"text": "b"})  # tokens again after 1 s: backoff 0.6 s, then 1.2 s

    assert [(r.status, r.error_code) for r in client.records] == [
        ("succeeded", ""),
        ("skipped", "rate_limited"),
        ("skipped", "rate_limited"),
        ("succeeded", ""),
    ]
    assert clock.sleeps == [0.6, 1.2] and stub.count == 2


def test_a_short_wait_for_a_token_is_just_a_wait(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    stub = stubs("metered")
    limit = RateLimit(per_second=4, burst=1, max_wait_seconds=1)
    capability = echo_capability(
        "search", http(stub, provider_name("metered"), rate_limit=limit), retry=RETRY
    )
    client = ToolClient(clock=clock)

    client.call(capability, {"text": "a"})
    client.call(capability, {"text": "b"})

    assert [r.status for r in client.records] == ["succeeded", "succeeded"]
    assert clock.sleeps == [pytest.approx(0.25)]


# --- bounds -------------------------------------------------------------------------------------


def test_the_time_budget_bounds_the_whole_call(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    down, backup = stubs("down"), stubs("backup")
    down.default = backup.default = StubReply(status=503)
    retry = RetryPolicy(
        max_attempts=10, base_seconds=1.0, max_delay_seconds=1.0, time_budget_seconds=3.5
    )
    capability = echo_capability(
        "search",
        http(down, provider_name("down"), priority=1),
        http(backup, provider_name("backup"), priority=2),
        retry=retry,
    )

    with pytest.raises(ToolCallFailedTransient):
        ToolClient(clock=clock, rng=_Always(1.0)).call(capability, {"text": "q"})

    assert sum(clock.sleeps) <= 3.5
    assert down.count + backup.count <= 5


class _Always(random.Random):
    """A random source whose uniform() always returns the same fraction of its range."""

    def __init__(self, fraction: float):
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.fraction


def test_when_every_provider_fails_the_error_lists_every_attempt(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    a, b = stubs("a"), stubs("b")
    a.default = b.default = StubReply(status=503)
    capability = echo_capability(
        "search",
        http(a, provider_name("a"), priority=1),
        http(b, provider_name("b"), priority=2),
        retry=RETRY,
    )
    client = ToolClient(clock=clock)

    with pytest.raises(ToolCallFailedTransient) as caught:
        client.call(capability, {"text": "q"})

    error = caught.value
    assert isinstance(error, TransientError) and error.code == "tool_call_failed"
    attempts = error.detail["attempts"]
    assert [(x["provider"], x["attempt"], x["error_code"]) for x in attempts] == [
        (r.provider, r.attempt, "provider_error") for r in client.records
    ]
    assert len(attempts) == 6 and all("latency_ms" in x for x in attempts)
    assert client.audit_entries[-1].verb == Verb.TOOL_CALL_EXHAUSTED


# --- what is recorded ---------------------------------------------------------------------------


def test_usage_reported_by_the_provider_is_recorded(stubs: Stubs, provider_name: Names) -> None:
    stub = stubs("metered")
    client = ToolClient()

    client.call(echo_capability("search", http(stub, provider_name("metered"))), {"text": "q"})

    record = client.records[0]
    assert record.tokens == 12 and float(record.cost_usd) == pytest.approx(0.0012)  # type: ignore[arg-type]
    assert '"served_by"' in record.result_summary and record.latency_ms >= 0


def test_long_results_are_summarised(stubs: Stubs, provider_name: Names) -> None:
    stub = stubs("verbose")
    client = ToolClient()

    client.call(
        echo_capability("search", http(stub, provider_name("verbose"))), {"text": "x" * 5000}
    )

    assert len(client.records[0].result_summary) == 1000 and client.records[
        0
    ].result_summary.endswith("…")


@pytest.mark.django_db
def test_records_and_audit_entries_are_saved_together(
    stubs: Stubs, provider_name: Names, clock: FakeClock
) -> None:
    stub = stubs("flaky")
    stub.reply_with(503)
    capability: Capability = echo_capability(
        "search", http(stub, provider_name("flaky")), retry=RETRY
    )
    client = ToolClient(clock=clock, actor_id="researcher")
    client.call(capability, {"text": "q"}, node="research", call_index=2, trace_id="t" * 32)

    client.save()

    rows = list(ToolCall.objects.order_by("id"))
    assert [(r.attempt, r.status, r.error_code) for r in rows] == [
        (1, "failed", "provider_error"),
        (2, "succeeded", ""),
    ]
    assert (
        rows[0].retry_delay_ms is not None
        and rows[1].node == "research"
        and rows[1].call_index == 2
    )
    events = list(AuditEvent.objects.order_by("id"))
    assert [e.verb for e in events] == [Verb.TOOL_CALL_FAILED, Verb.TOOL_CALLED]
    assert all(
        e.trace_id == "t" * 32 and e.actor_id == "researcher" and e.payload_digest for e in events
    )
    assert client.records == [] and client.audit_entries == []


@pytest.mark.django_db
def test_tool_calls_save_writes_rows_for_callers_outside_the_engine(
    stubs: Stubs, provider_name: Names
) -> None:
    stub = stubs("plain")
    client = ToolClient()
    client.call(echo_capability("search", http(stub, provider_name("plain"))), {"text": "q"})

    tool_calls_save(client.records)

    assert ToolCall.objects.count() == 1 and client.records[0].pk is not None


def test_the_step_soft_timeout_ends_a_call_in_flight_without_trying_elsewhere(
    stubs: Stubs, provider_name: Names
) -> None:
    import time

    from orchestration.errors import StepTimeout
    from orchestration.leases import interrupt_after

    slow, backup = stubs("slow"), stubs("backup")
    slow.default = StubReply(delay_seconds=3.0)
    client = ToolClient()
    capability = echo_capability(
        "search",
        http(slow, provider_name("slow"), priority=1, timeout_seconds=10.0),
        http(backup, provider_name("backup"), priority=2),
        retry=RETRY,
    )
    started = time.monotonic()
    with pytest.raises(StepTimeout), interrupt_after(0.3):
        client.call(capability, {"text": "q"})
    assert time.monotonic() - started < 2.0
    assert slow.count == 1 and backup.count == 0  # not classified as a provider failure
