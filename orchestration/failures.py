"""What the engine does when an attempt fails, as pure functions: the recovery tiers.

1. retry the step (a transient error, within ``max_attempts`` and ``retry_within``), after a
   backoff with full jitter;
2. then the node's fallback agent takes the step;
3. then the node's declared degraded result lets the run go on;
4. otherwise the step escalates to an operator (or fails the run, as the node declares).

Compensations always escalate. No database and no clock: the caller passes ``now`` and a random
source. ``orchestration.advance`` applies the answers; ``tests/orchestration/test_failures.py``
checks every tier.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestration.definition import Failure, Node, Workflow
from orchestration.errors import Code, ContractViolation, ErrorClass, LimitExceeded, SignalboxError
from policies.limits import CEILING_RAISE_TIER

#: At most this many tool calls are copied into an escalation's context (the rest are linked).
ESCALATION_TOOL_CALLS = 50

#: The operator's answers to an escalation.
RETRY, SKIP, ABORT = "retry", "skip", "abort"


# --- tier 1: retry ----------------------------------------------------------------------------


def retry_delay(
    failures: int, *, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(n-1)))."""
    return (rng or random).uniform(0, min(cap, base * 2 ** (failures - 1)))


@dataclass(frozen=True)
class Retry:
    """Queue the step again after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Do not retry: go on to the next tiers with ``error`` (bounds name themselves in it)."""

    error: SignalboxError


def attempt_failed(
    error: SignalboxError,
    *,
    failures: int,
    max_attempts: int,
    attempts_log: Sequence[Mapping[str, Any]],
    now: datetime,
    retry_within: timedelta,
    delay: float,
) -> Retry | GiveUp:
    """Tier 1, after the ``failures``-th failed attempt (``attempts_log`` includes it): a
    transient error is retried while attempts remain and the retry stays within
    ``retry_within`` of the first failure since the failure count was last reset (by a fallback
    agent or an operator's retry); anything else goes on to the next tiers."""
    if error.error_class != ErrorClass.TRANSIENT:
        return GiveUp(error)
    first = attempts_log[-failures].get("at") if 0 < failures <= len(attempts_log) else None
    window_start = datetime.fromisoformat(first) if isinstance(first, str) else now
    in_window = now + timedelta(seconds=delay) - window_start <= retry_within
    if failures < max_attempts and in_window:
        return Retry(delay)
    if failures >= max_attempts:
        return GiveUp(
            LimitExceeded(
                f"gave up after {failures} attempts (max_attempts {max_attempts}); last error: {error.message}",
                code=Code.MAX_ATTEMPTS,
                detail={"bound": "max_attempts", "limit": max_attempts, "last_error": error.code},
            )
        )
    return GiveUp(
        LimitExceeded(
            f"gave up after {failures} attempts: retrying would pass the retry window of "
            f"{retry_within.total_seconds():g} s; last error: {error.message}",
            code=Code.RETRY_WINDOW,
            detail={
                "bound": "retry_within",
                "limit_seconds": retry_within.total_seconds(),
                "last_error": error.code,
            },
        )
    )


def attempt_entry(
    *, attempt: int, agent: str, error: SignalboxError, now: datetime, worker: str = ""
) -> dict[str, Any]:
    """One line of a step's ``attempts_log``."""
    entry: dict[str, Any] = {
        "attempt": attempt,
        "agent": agent,
        "class": str(error.error_class),
        "code": str(error.code),
        "message": error.message[:500],
        "at": now.isoformat(),
    }
    if worker:
        entry["worker"] = worker
    return entry


def lease_expired_error(worker: str) -> SignalboxError:
    """A worker stopped renewing its lease: counted as a failed (transient) attempt, so a step
    that kills its worker every time is stopped by ``max_attempts`` instead of looping."""
    error = SignalboxError(f"worker {worker} stopped renewing its lease", code=Code.LEASE_EXPIRED)
    error.error_class = ErrorClass.TRANSIENT
    return error


def lease_exhausted_error(failures: int, max_attempts: int) -> LimitExceeded:
    return LimitExceeded(
        f"gave up after {failures} attempts (max_attempts {max_attempts}); the last worker was lost",
        code=Code.MAX_ATTEMPTS,
        detail={
            "bound": "max_attempts",
            "limit": max_attempts,
            "last_error": Code.LEASE_EXPIRED.value,
        },
    )


# --- tiers 2 to 4 -------------------------------------------------------------------------------


def agents_tried(attempts_log: Sequence[Mapping[str, Any]], current: str) -> list[str]:
    """The agents that ran a step so far, in order (the primary, then a fallback)."""
    tried = [str(entry.get("agent", "")) for entry in attempts_log if entry.get("agent")]
    return list(dict.fromkeys([*tried, current]))


@dataclass(frozen=True)
class FallBack:
    """Tier 2: the node's fallback agent takes the step, with attempts of its own."""

    agent: str


@dataclass(frozen=True)
class Degrade:
    """Tier 3: the step succeeds with the node's declared (contract-checked) degraded result."""

    output: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class Escalate:
    """Tier 4: the step waits for an operator."""

    error: SignalboxError


@dataclass(frozen=True)
class FailRun:
    """The node says ``on_failure="fail"``: the step fails and the run with it."""

    error: SignalboxError


def exhausted(
    wf: Workflow,
    node: Node,
    *,
    compensation: bool,
    failure: Failure,
    tried: Sequence[str],
    contract: type[BaseModel],
    error: SignalboxError,
) -> FallBack | Degrade | Escalate | FailRun:
    """An attempt failed and is not retried: which tier takes the step next."""
    if not compensation and node.fallback and node.fallback not in tried:
        return FallBack(node.fallback)
    if not compensation and node.degraded is not None:
        try:
            value = contract.model_validate(node.degraded.value(failure)).model_dump(mode="json")
        except (ValidationError, TypeError, ValueError) as exc:
            error = ContractViolation(
                f"the degraded result declared for {node.name!r} does not satisfy its contract "
                f"({exc.__class__.__name__})",
                code=Code.DEGRADED_CONTRACT,
            )
        else:
            return Degrade(value, f"{node.degraded.reason} (after {error.code})")
    if compensation or wf.on_failure_of(node) == "escalate":
        return Escalate(error)
    return FailRun(error)


# --- escalation context -------------------------------------------------------------------------


def escalation_why(error: SignalboxError) -> str:
    """Why a step needs a person, in a few words an operator reads first."""
    if error.code == Code.CEILING_EXCEEDED:
        return "limit reached (cost ceiling)"
    if error.code == Code.MAX_ATTEMPTS:
        return "retries exhausted"
    if error.error_class == ErrorClass.CONTRACT:
        return "contract violation"
    if error.error_class == ErrorClass.LIMIT:
        return f"limit reached ({error.code})"
    return f"{error.error_class} error"


def escalation_tier(error: SignalboxError) -> int:
    """The tier an escalation asks for: a step stopped at a cost ceiling waits for someone who
    may raise it (a lower tier could only retry into the same ceiling); anything else, tier 1."""
    return CEILING_RAISE_TIER if error.code == Code.CEILING_EXCEEDED else 1


def escalation_context(
    *,
    step_key: str,
    node: Node,
    kind: str,
    agent: str,
    compensation: bool,
    tried: Sequence[str],
    error: SignalboxError,
    attempts: Sequence[Mapping[str, Any]],
    tool_calls: Sequence[Mapping[str, Any]],
    step_input: Any,
    payload: Any,
    contract: type[BaseModel],
) -> dict[str, Any]:
    """Everything an operator needs to decide, frozen at escalation time."""
    return {
        "why": escalation_why(error),
        "step": step_key,
        "node": node.name,
        "kind": kind,
        "compensation": compensation,
        "agent": agent,
        "agents_tried": list(tried),
        "fallback": node.fallback or None,
        "error": {
            "class": str(error.error_class),
            "code": str(error.code),
            "message": error.message,
            "detail": error.detail,
        },
        "attempts": list(attempts),
        "tool_calls": list(tool_calls)[:ESCALATION_TOOL_CALLS],
        "input": truncate(step_input) if step_input is not None else None,
        "payload": truncate(payload) if payload is not None else None,
        "actions": [RETRY, SKIP, ABORT],
        "skip_contract": contract.__name__,
        "skip_schema": contract.model_json_schema(),
    }


def error_detail(error: SignalboxError, payload: Any) -> Any:
    """What a failed step records as its error detail: the error's, plus the offending payload."""
    return (
        error.detail if payload is None else {"detail": error.detail, "payload": truncate(payload)}
    )


def truncate(payload: Any, limit: int = 8_000) -> Any:
    """Keep offending payloads recordable: big ones are cut, with a note of their size."""
    try:
        text = json.dumps(payload, default=str)
    except (TypeError, ValueError):
        text = repr(payload)
    if len(text) <= limit:
        return payload
    return {"truncated": True, "size": len(text), "head": text[:limit]}
