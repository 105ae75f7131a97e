"""What the engine asks of a policy version around a decision: which ceilings an action's
spend counts against, which rate limits count it, a workflow's bounds, and what a model call
costs. Pure, on a compiled version (``policies.evaluate.compile_policy``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal

from policies.document import Bounds
from policies.evaluate import CompiledPolicy
from policies.facts import Facts

__all__ = [
    "CEILING_RAISE_TIER",
    "CeilingScope",
    "RateLimitBucket",
    "bounds_for",
    "ceilings_for",
    "ceilings_of",
    "price_cost",
    "rate_limits_for",
]

MONEY_QUANTUM = Decimal("0.000001")
#: The approval tier that may raise a cost ceiling: a step stopped at one escalates to it.
CEILING_RAISE_TIER = 2


@dataclass(frozen=True, slots=True)
class CeilingScope:
    """A ceiling that counts this action's spend: the ledger's scope kind and key, with limits."""

    scope: str
    #: The run id, workflow, agent or tenant this spend counts against ("" for global_day).
    key: str
    limit: Decimal
    soft_ratio: Decimal


@dataclass(frozen=True, slots=True)
class RateLimitBucket:
    """A rate limit that counts this action: at most ``limit`` per ``period`` in ``key``'s bucket."""

    id: str
    #: The counter's name: the limit's id, and the tenant/workflow/agent/run it is counted per.
    key: str
    limit: int
    period: timedelta


_SCOPE_FACT = {
    "run": "workflow",
    "workflow_day": "workflow",
    "agent_day": "agent",
    "tenant_month": "tenant",
}


def ceilings_for(policy: CompiledPolicy, facts: Facts) -> tuple[CeilingScope, ...]:
    """The ceilings this action's spend counts against, one per scope: a ceiling keyed to this
    workflow, agent or tenant beats the scope's unkeyed one. A scope whose key is unknown (no
    run id, no tenant) is left out; ``global_day`` never is."""
    return ceilings_of(
        policy, workflow=facts.workflow, agent=facts.agent, tenant=facts.tenant, run_id=facts.run_id
    )


def ceilings_of(
    policy: CompiledPolicy, *, workflow: str, agent: str, tenant: str, run_id: int | None
) -> tuple[CeilingScope, ...]:
    """:func:`ceilings_for` from the only facts it reads. Which ceilings apply to a workflow,
    agent and tenant is worked out once per compiled version; only the run's key is new per
    call (a priced call asks twice: when its step is claimed and when it runs)."""
    shape = policy.ceiling_shapes.get((workflow, agent, tenant))
    if shape is None:
        shape = _ceiling_shape(policy, workflow, agent, tenant)
        if len(policy.ceiling_shapes) >= CEILING_SHAPES_SIZE:
            policy.ceiling_shapes.clear()
        policy.ceiling_shapes[(workflow, agent, tenant)] = shape
    if run_id is None or not shape or shape[0].scope != "run":
        return tuple(scope for scope in shape if scope.scope != "run")
    run = shape[0]
    return (CeilingScope("run", str(run_id), run.limit, run.soft_ratio), *shape[1:])


#: Bounds a compiled version's cache of ceiling shapes (a shape per workflow, agent and tenant).
CEILING_SHAPES_SIZE = 4096


def _ceiling_shape(
    policy: CompiledPolicy, workflow: str, agent: str, tenant: str
) -> tuple[CeilingScope, ...]:
    """The ceilings of a workflow, agent and tenant, in scope order; the run's (if any) with an
    empty key, filled in per run by :func:`ceilings_of`."""
    values = {"workflow": workflow, "agent": agent, "tenant": tenant}
    found: dict[str, CeilingScope] = {}
    keyed: set[str] = set()
    for ceiling in policy.document.ceilings:
        scope = ceiling.scope
        if scope == "global_day":
            key = ""
        else:
            filter_value = values[_SCOPE_FACT[scope]]
            if ceiling.key is not None and ceiling.key != filter_value:
                continue
            key = "" if scope == "run" else filter_value
            if not key and scope != "run":
                continue
        if scope in keyed:
            continue
        if ceiling.key is not None:
            keyed.add(scope)
        found[scope] = CeilingScope(scope, key, ceiling.limit, ceiling.soft_ratio)
    return tuple(
        found[scope]
        for scope in ("run", "workflow_day", "agent_day", "tenant_month", "global_day")
        if scope in found
    )


def rate_limits_for(policy: CompiledPolicy, facts: Facts) -> tuple[RateLimitBucket, ...]:
    """The rate limits that count this action, each with the bucket it is counted in."""
    buckets = []
    for limit, action in policy.rate_limits:
        if action.match(facts.action) is None:
            continue
        if limit.per == "global":
            key = limit.id
        else:
            value = facts.run_id if limit.per == "run" else getattr(facts, limit.per)
            key = f"{limit.id}:{limit.per}={value if value not in (None, '') else '-'}"
        buckets.append(RateLimitBucket(limit.id, key, limit.limit, limit.period))
    return tuple(buckets)


def bounds_for(policy: CompiledPolicy, workflow: str) -> Bounds:
    """The workflow's bounds: its own entry over the ``"*"`` entry, field by field; a field
    neither sets is None (the workflow's definition applies)."""
    general = policy.document.bounds.get("*", Bounds())
    own = policy.document.bounds.get(workflow, Bounds())
    return Bounds.model_validate(
        {**general.model_dump(exclude_none=True), **own.model_dump(exclude_none=True)}
    )


def price_cost(
    policy: CompiledPolicy, model: str, input_tokens: int, output_tokens: int
) -> Decimal | None:
    """What a call costs in the policy's currency, from its token counts, rounded up to the
    ledger's six decimal places; None for a model the price table does not know (the caller
    fails closed)."""
    price = policy.document.prices.get(model)
    if price is None:
        return None
    cost = (price.input_per_1k * input_tokens + price.output_per_1k * output_tokens) / 1000
    return cost.quantize(MONEY_QUANTUM, rounding=ROUND_CEILING)
