"""Per-provider rate limits and circuit breakers, shared by every worker process.

Both live in Redis and change only inside Lua scripts, so concurrent workers on any machine see
one bucket and one circuit per provider. Without Redis (embedded mode: one process) the same
algorithms run in memory under a lock. Time is the caller's wall clock, passed in, so tests can
drive it; worker clocks are assumed NTP-synchronised (a skew shifts refills and cool-downs by it).

Rate limit: a token bucket per provider (``per_second`` refill, ``burst`` capacity).

Circuit breaker per provider: *closed* counts calls and failures in a rolling window (slots of a
tenth of the window); when ``min_calls`` are reached and the failure rate reaches the threshold it
turns *open* and calls fail fast without touching the network. After the cool-down the first
caller becomes the single *half-open* probe (everyone else still fails fast); the probe's success
closes the circuit, its failure re-opens it. A probe that never reports (its worker died) is
replaced after its deadline. Every transition is returned to the caller, who records it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestration.tools.limit_backends import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    WINDOW_SLOTS,
    Backend,
    backend_default,
    window_totals,
)
from orchestration.tools.providers import Provider

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Admission",
    "CircuitBreaker",
    "CircuitState",
    "CircuitTransition",
    "Headroom",
    "RateLimiter",
    "breaker",
    "headroom",
    "rate_limiter",
]

#: A probe may take its provider's timeout and rate-limit wait plus this before another replaces it.
PROBE_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class CircuitTransition:
    """A provider's circuit changed state; the caller writes it to the audit log."""

    provider: str
    from_state: str
    to_state: str
    at: float
    calls: int = 0
    failures: int = 0


@dataclass(frozen=True)
class Admission:
    """Whether a call may go out now; ``probe_id`` is set when it is the half-open probe."""

    allowed: bool
    state: str
    probe_id: str = ""
    transition: CircuitTransition | None = None


@dataclass(frozen=True)
class CircuitState:
    """A provider's circuit as an API or console shows it."""

    provider: str
    state: str
    changed_at: float | None
    opened_at: float | None
    #: When an open circuit lets its probe through.
    probe_after: float | None
    calls: int
    failures: int


@dataclass(frozen=True)
class Headroom:
    """Tokens a provider's bucket holds now (calls that may start without waiting)."""

    provider: str
    tokens: float
    burst: int
    per_second: float


# --- the two mechanisms -------------------------------------------------------------------------


class RateLimiter:
    """Token buckets per provider."""

    def __init__(self, backend: Backend | None = None):
        self._backend = backend

    @property
    def backend(self) -> Backend:
        return self._backend or backend_default()

    def take(self, provider: Provider, *, now: float) -> float:
        """Take a token: 0.0 when one was taken, else the seconds until one will be there."""
        limit = provider.rate_limit
        if limit is None:
            return 0.0
        return self.backend.bucket_take(provider.name, limit.per_second, limit.burst, now)

    def headroom(self, provider: Provider, *, now: float | None = None) -> Headroom | None:
        """Calls that may start now without waiting (``None``: the provider has no limit)."""
        limit = provider.rate_limit
        if limit is None:
            return None
        now = time.time() if now is None else now
        tokens, ts = self.backend.bucket_read(provider.name)
        if tokens is None or ts is None:
            tokens = float(limit.burst)
        elif now > ts:
            tokens = min(float(limit.burst), tokens + (now - ts) * limit.per_second)
        return Headroom(provider.name, round(tokens, 3), limit.burst, limit.per_second)


class CircuitBreaker:
    """Circuits per provider."""

    def __init__(self, backend: Backend | None = None):
        self._backend = backend

    @property
    def backend(self) -> Backend:
        return self._backend or backend_default()

    def acquire(self, provider: Provider, *, now: float) -> Admission:
        """May a call to ``provider`` go out now? Elects the single probe of a half-open circuit."""
        policy = provider.breaker
        wait = provider.rate_limit.max_wait_seconds if provider.rate_limit else 0.0
        probe_ttl = provider.timeout_seconds + wait + PROBE_GRACE_SECONDS
        probe_id = uuid.uuid4().hex
        verdict, state, came_from = self.backend.circuit_acquire(
            provider.name, now, policy.cooldown_seconds, probe_ttl, probe_id
        )
        transition = CircuitTransition(provider.name, came_from, state, now) if came_from else None
        return Admission(
            verdict != "reject", state, probe_id if verdict == "probe" else "", transition
        )

    def record(
        self, provider: Provider, *, ok: bool, probe_id: str, now: float
    ) -> CircuitTransition | None:
        """Count a call's outcome; returns the transition it caused, if any."""
        policy = provider.breaker
        state, came_from, calls, failures = self.backend.circuit_record(
            provider.name,
            now,
            ok,
            probe_id,
            policy.failure_rate,
            policy.min_calls,
            policy.window_seconds,
        )
        if not came_from:
            return None
        return CircuitTransition(provider.name, came_from, state, now, int(calls), int(failures))

    def release(self, provider: Provider, probe_id: str) -> None:
        """A probe that will not call after all (no rate-limit token): let the next caller probe."""
        if probe_id:
            self.backend.circuit_release(provider.name, probe_id)

    def state(self, provider: Provider, *, now: float | None = None) -> CircuitState:
        """The provider's circuit now, with the calls and failures in its current window."""
        now = time.time() if now is None else now
        circuit, counts = self.backend.circuit_read(provider.name)
        oldest = int(now // (provider.breaker.window_seconds / WINDOW_SLOTS)) - WINDOW_SLOTS + 1
        calls, failures = window_totals({k: v for k, v in counts.items() if int(k[2:]) >= oldest})
        state = circuit.get("state", CLOSED)
        opened_at = _float(circuit.get("opened_at")) if state != CLOSED else None
        probe_after = (
            opened_at + provider.breaker.cooldown_seconds if state == OPEN and opened_at else None
        )
        return CircuitState(
            provider.name,
            state,
            _float(circuit.get("changed_at")),
            opened_at,
            probe_after,
            calls,
            failures,
        )

    def reset(self, provider: Provider) -> None:
        """Forget the provider's circuit and bucket (an operator's reset; tests)."""
        self.backend.reset(provider.name)


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


rate_limiter = RateLimiter()
breaker = CircuitBreaker()


def headroom(provider: Provider) -> Headroom | None:
    """Rate-limit headroom of ``provider`` now, as every worker sees it."""
    return rate_limiter.headroom(provider)
