"""Rate limits and circuit breakers: the same behaviour in Redis (shared) and in memory
(embedded), driven by explicit time; then the shared rate limit across two real processes."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings

from orchestration.errors import TransientError
from orchestration.tools.limit_backends import Backend, MemoryBackend, RedisBackend
from orchestration.tools.limits import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RateLimiter
from orchestration.tools.providers import (
    BreakerPolicy,
    FunctionProvider,
    HttpJsonProvider,
    RateLimit,
)
from orchestration.tools.registry import RetryPolicy
from tests.support.stub_provider import StubProvider, call_repeatedly_when_told, echo_capability

T0 = 1_900_000_000.0


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return RedisBackend(settings.REDIS_URL) if request.param == "redis" else MemoryBackend()


def _provider(name: str, **kwargs: Any) -> FunctionProvider:
    return FunctionProvider(
        name=name, function=lambda params, **kw: {}, timeout_seconds=1.0, **kwargs
    )


@pytest.fixture
def limited(provider_name: Callable[[str], str]) -> FunctionProvider:
    return _provider(provider_name("limited"), rate_limit=RateLimit(per_second=2, burst=3))


@pytest.fixture
def guarded(provider_name: Callable[[str], str]) -> FunctionProvider:
    policy = BreakerPolicy(failure_rate=0.5, min_calls=4, window_seconds=10, cooldown_seconds=5)
    return _provider(provider_name("guarded"), breaker=policy)


# --- token bucket -------------------------------------------------------------------------------


def test_a_bucket_gives_its_burst_then_one_token_per_interval(
    backend: Backend, limited: FunctionProvider
) -> None:
    limiter = RateLimiter(backend)

    waits = [limiter.take(limited, now=T0) for _ in range(4)]

    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(0.5)
    assert limiter.take(limited, now=T0 + 0.25) == pytest.approx(0.25)
    assert limiter.take(limited, now=T0 + 0.5) == 0.0


def test_a_bucket_refills_up_to_its_burst_only(backend: Backend, limited: FunctionProvider) -> None:
    limiter = RateLimiter(backend)
    for _ in range(3):
        limiter.take(limited, now=T0)

    after_a_long_pause = [limiter.take(limited, now=T0 + 100) for _ in range(4)]

    assert after_a_long_pause[:3] == [0.0, 0.0, 0.0]
    assert after_a_long_pause[3] > 0


def test_headroom_shows_the_tokens_available_now(
    backend: Backend, limited: FunctionProvider
) -> None:
    limiter = RateLimiter(backend)
    assert limiter.headroom(limited, now=T0).tokens == 3  # type: ignore[union-attr]

    limiter.take(limited, now=T0)
    limiter.take(limited, now=T0)

    assert limiter.headroom(limited, now=T0).tokens == pytest.approx(1)  # type: ignore[union-attr]
    assert limiter.headroom(limited, now=T0 + 0.5).tokens == pytest.approx(2)  # type: ignore[union-attr]
    assert limiter.headroom(_provider("unlimited"), now=T0) is None


# --- circuit breaker ----------------------------------------------------------------------------


def _fail(
    breaker: CircuitBreaker, provider: FunctionProvider, now: float, times: int = 1
) -> list[Any]:
    return [breaker.record(provider, ok=False, probe_id="", now=now) for _ in range(times)]


def test_the_circuit_stays_closed_below_min_calls(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)

    assert _fail(breaker, guarded, T0, times=3) == [None, None, None]
    assert breaker.state(guarded, now=T0).state == CLOSED
    assert breaker.acquire(guarded, now=T0).allowed


def test_the_circuit_opens_at_the_failure_rate_and_fails_fast(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    breaker.record(guarded, ok=True, probe_id="", now=T0)
    breaker.record(guarded, ok=True, probe_id="", now=T0)
    assert _fail(breaker, guarded, T0) == [None]  # 1 of 3

    opened = breaker.record(guarded, ok=False, probe_id="", now=T0 + 1)  # 2 of 4: 50 %

    assert opened is not None
    assert (opened.from_state, opened.to_state, opened.calls, opened.failures) == (
        CLOSED,
        OPEN,
        4,
        2,
    )
    admission = breaker.acquire(guarded, now=T0 + 2)
    assert not admission.allowed and admission.state == OPEN
    state = breaker.state(guarded, now=T0 + 2)
    assert state.state == OPEN and state.probe_after == pytest.approx(T0 + 1 + 5)


def test_successes_alone_never_open_the_circuit(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)

    for _ in range(10):
        assert breaker.record(guarded, ok=True, probe_id="", now=T0) is None

    assert breaker.state(guarded, now=T0).calls == 10


def test_old_failures_leave_the_rolling_window(backend: Backend, guarded: FunctionProvider) -> None:
    breaker = CircuitBreaker(backend)
    _fail(breaker, guarded, T0, times=3)

    # Eleven seconds later the window (10 s) has forgotten them.
    assert _fail(breaker, guarded, T0 + 11) == [None]
    assert breaker.state(guarded, now=T0 + 11).failures == 1


def _open(breaker: CircuitBreaker, provider: FunctionProvider, now: float) -> None:
    transitions = _fail(breaker, provider, now, times=4)
    assert transitions[-1] is not None and transitions[-1].to_state == OPEN


def test_after_the_cool_down_exactly_one_probe_goes_through(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)
    assert not breaker.acquire(guarded, now=T0 + 4.9).allowed

    first = breaker.acquire(guarded, now=T0 + 5)
    second = breaker.acquire(guarded, now=T0 + 5)

    assert first.allowed and first.probe_id
    assert first.transition is not None and (
        first.transition.from_state,
        first.transition.to_state,
    ) == (OPEN, HALF_OPEN)
    assert not second.allowed and second.state == HALF_OPEN


def test_a_successful_probe_closes_the_circuit(backend: Backend, guarded: FunctionProvider) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)
    probe = breaker.acquire(guarded, now=T0 + 6)

    closed = breaker.record(guarded, ok=True, probe_id=probe.probe_id, now=T0 + 6.1)

    assert closed is not None and (closed.from_state, closed.to_state) == (HALF_OPEN, CLOSED)
    assert breaker.acquire(guarded, now=T0 + 6.2).allowed
    assert breaker.state(guarded, now=T0 + 6.2).calls == 0  # a fresh window


def test_a_failed_probe_opens_the_circuit_again(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)
    probe = breaker.acquire(guarded, now=T0 + 6)

    reopened = breaker.record(guarded, ok=False, probe_id=probe.probe_id, now=T0 + 6.1)

    assert reopened is not None and (reopened.from_state, reopened.to_state) == (HALF_OPEN, OPEN)
    assert not breaker.acquire(guarded, now=T0 + 10).allowed  # a new cool-down from 6.1
    assert breaker.acquire(guarded, now=T0 + 11.2).allowed


def test_late_reports_from_before_the_opening_change_nothing(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)

    assert breaker.record(guarded, ok=True, probe_id="", now=T0 + 1) is None
    assert breaker.state(guarded, now=T0 + 1).state == OPEN


def test_a_probe_that_never_reports_is_replaced_after_its_deadline(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)
    lost = breaker.acquire(guarded, now=T0 + 5)
    deadline = T0 + 5 + guarded.timeout_seconds + 2.0  # timeout + grace

    assert not breaker.acquire(guarded, now=deadline - 0.1).allowed
    replacement = breaker.acquire(guarded, now=deadline + 0.1)

    assert replacement.allowed and replacement.probe_id != lost.probe_id
    # The lost probe's late answer no longer decides.
    assert breaker.record(guarded, ok=True, probe_id=lost.probe_id, now=deadline + 0.2) is None
    assert breaker.state(guarded, now=deadline + 0.2).state == HALF_OPEN


def test_a_released_probe_lets_the_next_caller_probe(
    backend: Backend, guarded: FunctionProvider
) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)
    probe = breaker.acquire(guarded, now=T0 + 5)

    breaker.release(guarded, probe.probe_id)

    assert breaker.acquire(guarded, now=T0 + 5.1).allowed


def test_reset_forgets_the_circuit(backend: Backend, guarded: FunctionProvider) -> None:
    breaker = CircuitBreaker(backend)
    _open(breaker, guarded, T0)

    breaker.reset(guarded)

    assert breaker.state(guarded, now=T0).state == CLOSED


# --- shared by processes ------------------------------------------------------------------------


def test_two_processes_share_one_rate_limit(
    stubs: Callable[[str], StubProvider],
    provider_name: Callable[[str], str],
    spawn: Callable[..., Any],
) -> None:
    stub = stubs("shared")
    limit = RateLimit(per_second=10, burst=3, max_wait_seconds=0.5)
    provider = HttpJsonProvider(name=provider_name("shared"), url=stub.url, rate_limit=limit)
    capability = echo_capability(
        "shared_echo", provider, retry=RetryPolicy(max_attempts=1, time_budget_seconds=5)
    )
    context = multiprocessing.get_context("spawn")
    go, out = context.Event(), context.Queue()
    for _ in range(2):
        spawn(call_repeatedly_when_told, capability, {"text": "hi"}, go, 1.0, out)
    assert [out.get(timeout=60)[0] for _ in range(2)] == ["ready", "ready"]

    started = time.time()
    go.set()
    reports = [out.get(timeout=30) for _ in range(2)]

    duration = max(report[3] for report in reports) - started
    assert 1.0 <= duration < 3.0
    assert stub.count <= limit.per_second * duration + limit.burst
    # Both processes were served, and together they used most of what the limit allows.
    assert all(report[1] > 0 for report in reports)
    assert stub.count >= limit.per_second * 1.0 * 0.7
    assert sum(report[1] for report in reports) == stub.count


def test_unreachable_shared_state_is_a_transient_error() -> None:
    limiter = RateLimiter(RedisBackend("redis://127.0.0.1:9/0"))
    provider = _provider("nowhere", rate_limit=RateLimit(per_second=1))

    with pytest.raises(TransientError) as caught:
        limiter.take(provider, now=T0)

    assert caught.value.code == "limits_unavailable"
