"""The call path: validate, pick a provider, respect its circuit and rate limit, retry, fall over,
validate the result, and record every attempt.

The client writes nothing itself. It collects :class:`ToolCall` rows, audit entries and circuit
transitions in lists (``records``, ``audit_entries``, ``circuit_transitions``) so the engine
writes them inside the transaction that completes (or fails) the step; callers outside the
engine use :meth:`ToolClient.save` / :func:`tool_calls_save`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from django.utils import timezone
from pydantic import BaseModel, ValidationError

from audit.services import Entry
from audit.verbs import ActorType
from orchestration.contracts import validation_errors
from orchestration.errors import (
    Code,
    ContractViolation,
    ErrorClass,
    PermanentError,
    SignalboxError,
    StepTimeout,
    TransientError,
)
from orchestration.models import ToolCall, ToolCallStatus
from orchestration.tools.classify import failure_classify, provider_unusable, transient
from orchestration.tools.limits import (
    CircuitBreaker,
    CircuitTransition,
    RateLimiter,
)
from orchestration.tools.limits import breaker as default_breaker
from orchestration.tools.limits import rate_limiter as default_rate_limiter
from orchestration.tools.providers import Failure, Provider, ProviderUsage
from orchestration.tools.records import CallLog, Redactor, tool_calls_save
from orchestration.tools.registry import Capability, RetryPolicy, capability_get

logger = logging.getLogger(__name__)


class ToolCallFailed(SignalboxError):
    """Every provider of a capability failed; ``detail["attempts"]`` lists each attempt."""

    code: str = Code.TOOL_CALL_FAILED


class ToolCallFailedTransient(ToolCallFailed, TransientError):
    """Every provider failed, the last one transiently: the step may be retried later."""


class ToolCallFailedPermanent(ToolCallFailed, PermanentError):
    """The call cannot succeed as asked (refused request, broken contract): no retry."""


def tool_idempotency_key(run_id: int | None, node: str, call_index: int) -> str:
    """The key a side-effecting call carries on every attempt: sha256 of (run, node, call index)."""
    return hashlib.sha256(f"{run_id}:{node}:{call_index}".encode()).hexdigest()


class Clock(Protocol):
    def time(self) -> float: ...
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Wall time for shared limits, monotonic time for budgets, real sleeps."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class _Call:
    """One ``ToolClient.call`` in progress."""

    capability: Capability
    params: dict[str, Any]
    idempotency_key: str
    deadline: float
    log: CallLog


class ToolClient:
    """Calls capabilities for one step (or one caller) and keeps what must be recorded."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        limiter: RateLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        actor_type: str = ActorType.AGENT,
        actor_id: str = "",
        reraise: tuple[type[BaseException], ...] = (),
    ):
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.limiter = limiter or default_rate_limiter
        self.breaker = breaker or default_breaker
        self.actor_type = actor_type
        self.actor_id = actor_id
        #: Exceptions that end the call at once, unclassified: the step's soft timeout always.
        self.reraise: tuple[type[BaseException], ...] = (StepTimeout, *reraise)
        self.records: list[ToolCall] = []
        self.audit_entries: list[Entry] = []
        self.circuit_transitions: list[CircuitTransition] = []

    def call(
        self,
        capability: str | Capability,
        params: BaseModel | Mapping[str, Any],
        *,
        run_id: int | None = None,
        step_id: int | None = None,
        node: str = "",
        call_index: int = 0,
        trace_id: str = "",
        idempotency_key: str | None = None,
    ) -> BaseModel:
        """Call ``capability`` and return its validated result (an instance of its ``Result``).

        ``node`` should be the step key (``draft#2``, ``answer[3]``) and ``call_index`` the
        call's number within the step, so loop visits and map items get distinct idempotency
        keys while retries and re-claims of the same step reuse theirs. Raises
        :class:`ContractViolation` for bad params and :class:`ToolCallFailed` when no provider
        served the call."""
        cap = capability if isinstance(capability, Capability) else capability_get(capability)
        payload = _validate_params(cap, params).model_dump(mode="json")
        key = _idempotency_key(cap, run_id, node, call_index, idempotency_key)
        redactor = Redactor.for_call(cap, payload)
        log = CallLog(
            capability=cap.name,
            run_id=run_id,
            step_id=step_id,
            trace_id=trace_id,
            node=node,
            call_index=call_index,
            idempotency_key=key,
            actor_type=self.actor_type,
            actor_id=self.actor_id,
            redactor=redactor,
            params=redactor.value(payload),
            records=self.records,
            entries=self.audit_entries,
        )
        deadline = self.clock.monotonic() + cap.retry.time_budget_seconds
        call = _Call(cap, payload, key, deadline, log)
        last: Failure | None = None
        for provider in cap.providers_in_order():
            outcome = self._try_provider(call, provider)
            if isinstance(outcome, BaseModel):
                return outcome
            last = outcome
            if not last.next_provider:
                break
        assert last is not None
        raise self._exhausted(call, last)

    def save(self) -> None:
        """Write what was collected (records and audit entries) and start afresh."""
        tool_calls_save(self.records, self.audit_entries)
        self.records, self.audit_entries, self.circuit_transitions = [], [], []

    # --- one provider ------------------------------------------------------------------------

    def _try_provider(self, call: _Call, provider: Provider) -> BaseModel | Failure:
        policy = call.capability.retry
        failure: Failure | None = None
        for attempt in range(1, policy.max_attempts + 1):
            remaining = call.deadline - self.clock.monotonic()
            if remaining <= 0:
                return _budget_spent(policy, failure)
            admission = self.breaker.acquire(provider, now=self.clock.time())
            self._transition(call, admission.transition)
            if not admission.allowed:
                # Fail fast, no request: the next provider (if any) serves the call.
                failure = replace(
                    transient(
                        Code.CIRCUIT_OPEN, f"circuit of {provider.name} is {admission.state}"
                    ),
                    retry=False,
                )
                call.log.attempt(provider, attempt, ToolCallStatus.SKIPPED, failure=failure)
                return failure
            if self._wait_for_token(provider, remaining):
                result, failure, record = self._attempt(
                    call, provider, attempt, admission.probe_id, remaining
                )
                if result is not None:
                    return result
            else:
                self.breaker.release(provider, admission.probe_id)
                assert provider.rate_limit is not None
                failure = transient(
                    Code.RATE_LIMITED,
                    f"no rate-limit token for {provider.name} within {provider.rate_limit.max_wait_seconds}s",
                )
                record = call.log.attempt(
                    provider, attempt, ToolCallStatus.SKIPPED, failure=failure
                )
            assert failure is not None
            if not failure.retry or attempt == policy.max_attempts:
                return failure
            delay = self._backoff(policy, attempt, failure)
            if self.clock.monotonic() + delay >= call.deadline:
                # No time to wait here; whatever budget is left may still suit the next provider.
                return failure
            record.retry_delay_ms = round(delay * 1000)
            self.clock.sleep(delay)
        assert failure is not None
        return failure

    def _attempt(
        self, call: _Call, provider: Provider, attempt: int, probe_id: str, remaining: float
    ) -> tuple[BaseModel | None, Failure | None, ToolCall]:
        started_at = timezone.now()
        started = time.perf_counter()
        raw: Any = None
        result: BaseModel | None = None
        failure: Failure | None = None
        try:
            raw = provider.call(
                dict(call.params),
                idempotency_key=call.idempotency_key or None,
                timeout=min(provider.timeout_seconds, remaining),
            )
        except self.reraise:
            raise
        except Exception as exc:
            failure = failure_classify(exc, provider)
        else:
            try:
                result = call.capability.Result.model_validate(raw)
            except ValidationError as exc:
                failure = provider_unusable(
                    Code.RESULT_CONTRACT,
                    f"result from {provider.name} does not satisfy the {call.capability.name} contract",
                    ErrorClass.CONTRACT,
                    detail={"errors": validation_errors(exc)},
                )
        latency_ms = round((time.perf_counter() - started) * 1000)
        healthy = failure is None or not failure.provider_fault
        self._transition(
            call,
            self.breaker.record(provider, ok=healthy, probe_id=probe_id, now=self.clock.time()),
        )
        usage = provider.usage(raw) if isinstance(raw, dict) else ProviderUsage()
        status = ToolCallStatus.SUCCEEDED if failure is None else ToolCallStatus.FAILED
        record = call.log.attempt(
            provider,
            attempt,
            status,
            failure=failure,
            latency_ms=latency_ms,
            result=raw if failure is None else None,
            usage=usage,
            started_at=started_at,
        )
        return result, failure, record

    def _wait_for_token(self, provider: Provider, remaining: float) -> bool:
        limit = provider.rate_limit
        if limit is None:
            return True
        give_up_at = self.clock.monotonic() + min(limit.max_wait_seconds, remaining)
        while True:
            wait = self.limiter.take(provider, now=self.clock.time())
            if wait <= 0:
                return True
            if self.clock.monotonic() + wait > give_up_at:
                return False
            self.clock.sleep(wait)

    def _backoff(self, policy: RetryPolicy, attempt: int, failure: Failure) -> float:
        delay = self.rng.uniform(0, policy.delay_bound(attempt))
        if failure.retry_after:
            # The provider said when to come back: not sooner, but never past our own cap.
            delay = max(delay, min(failure.retry_after, policy.max_delay_seconds))
        return delay

    # --- records -----------------------------------------------------------------------------

    def _transition(self, call: _Call, transition: CircuitTransition | None) -> None:
        if transition is None:
            return
        logger.info(
            "circuit of %s: %s -> %s",
            transition.provider,
            transition.from_state,
            transition.to_state,
        )
        self.circuit_transitions.append(transition)
        call.log.transition(transition)

    def _exhausted(self, call: _Call, last: Failure) -> ToolCallFailed:
        detail = call.log.exhausted(last)
        message = (
            f"{call.capability.name}: no provider served the call ({len(detail['attempts'])} "
            f"attempts on {detail['providers']}); last error {last.code}"
        )
        logger.warning(message)
        if last.error_class == ErrorClass.TRANSIENT:
            return ToolCallFailedTransient(message, detail=detail)
        failed = ToolCallFailedPermanent(message, detail=detail)
        failed.error_class = last.error_class
        return failed


def _validate_params(cap: Capability, params: BaseModel | Mapping[str, Any]) -> BaseModel:
    if isinstance(params, cap.Params):
        return params
    data = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    try:
        return cap.Params.model_validate(data)
    except ValidationError as exc:
        raise ContractViolation(
            f"params for {cap.name!r} do not satisfy its contract",
            code=Code.TOOL_PARAMS_CONTRACT,
            detail={"capability": cap.name, "errors": validation_errors(exc)},
        ) from None


def _idempotency_key(
    cap: Capability, run_id: int | None, node: str, call_index: int, given: str | None
) -> str:
    if given:
        return given
    if not cap.side_effects:
        return ""
    if run_id is None:
        raise PermanentError(
            f"{cap.name!r} has side effects: call it with a run_id or an explicit idempotency_key",
            code=Code.IDEMPOTENCY_KEY_REQUIRED,
        )
    return tool_idempotency_key(run_id, node, call_index)


def _budget_spent(policy: RetryPolicy, last: Failure | None) -> Failure:
    message = f"the call's time budget ({policy.time_budget_seconds}s) ran out"
    if last is not None:
        message += f" after {last.code}"
    return replace(transient(Code.TIME_BUDGET_EXHAUSTED, message), retry=False, next_provider=False)
