"""What an agent step's call may cost, decided at the policy's boundary: the facts of an
action, the policy's rate limits, and the reservation against the cost ceilings before the call
(asked for in the transaction that claims the step where its worst case is known then, so it
costs no round trip of its own) and its settlement after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from pydantic import BaseModel

from audit.services import Entry, audit_record_alone, audit_record_many
from audit.verbs import Verb
from infra.sql import BY_KEY
from orchestration.agents.base import Agent, AgentContext
from orchestration.dispatch import hint_of
from orchestration.errors import Code, PolicyDenied, TransientError
from orchestration.models import Step, StepKind, StepStatus
from orchestration.registry import agent_instance, workflow_get
from orchestration.tools.limit_backends import backend_default
from policies.active import ActivePolicy, active_policy
from policies.errors import CeilingExceeded
from policies.evaluate import CompiledPolicy
from policies.facts import Facts
from policies.ledger import (
    Held,
    HoldRequest,
    Settlement,
    ceiling_release,
    ceiling_reserve,
    hold_request,
    periods_of,
)
from policies.limits import CeilingScope, ceilings_for, ceilings_of, price_cost, rate_limits_for
from policies.models import Reservation, ReservationKind
from policies.tenants import tenant_by_id


def policy_facts(
    step: Step, action: str, params: dict[str, Any], active: ActivePolicy | None = None
) -> tuple[ActivePolicy, Facts] | None:
    """The policy in force (``active``, by default the one now) and the facts of an action of
    ``step`` (None: no policy is in force)."""
    active = active or active_policy()
    if active is None:
        return None
    run = step.run
    tenant = tenant_by_id(run.tenant_id)
    facts = Facts(
        action=action,
        workflow=run.workflow_name,
        node=step.node,
        tenant=tenant.slug,
        tenant_time_zone=tenant.time_zone,
        agent=step.agent,
        params=params,
        run_id=run.id,
    )
    return active, facts


class StepFacts:
    """The policy in force and an agent step's facts (:func:`policy_facts`), which are built
    only when something reads them: a rate limit that counts the action, or a worst case that
    depends on the input. Most steps need neither."""

    __slots__ = ("_facts", "action", "active", "params", "step")

    def __init__(self, active: ActivePolicy, step: Step, params: dict[str, Any]) -> None:
        self.active = active
        self.step = step
        self.action = f"agent:{step.agent}"
        self.params = params
        self._facts: Facts | None = None

    @property
    def facts(self) -> Facts:
        if self._facts is None:
            found = policy_facts(self.step, self.action, self.params, self.active)
            assert found is not None
            self._facts = found[1]
        return self._facts

    def rate_limit_check(self) -> None:
        """:func:`rate_limit_check` of the step's action, if a rate limit counts it."""
        if self.active.compiled.rate_limited(self.action):
            rate_limit_check(self.active, self.facts)


def step_facts(step: Step, params: dict[str, Any]) -> StepFacts | None:
    """:class:`StepFacts` of ``step`` acting with ``params`` (None: no policy is in force)."""
    active = active_policy()
    return StepFacts(active, step, params) if active is not None else None


def rate_limit_check(active: ActivePolicy, facts: Facts) -> None:
    """Take one from each of the policy's rate limits that count this action (buckets shared by
    every worker through Redis); over one, a transient error: the step is retried after a
    backoff."""
    for bucket in rate_limits_for(active.compiled, facts):
        wait = backend_default().bucket_take(
            f"policy:{bucket.key}",
            bucket.limit / bucket.period.total_seconds(),
            bucket.limit,
            time.time(),
        )
        if wait > 0:
            raise TransientError(
                f"rate limit {bucket.id}: at most {bucket.limit} per {bucket.period}; next in {wait:.1f} s",
                code=Code.RATE_LIMITED,
                detail={"limit": bucket.id, "retry_after": round(wait, 3)},
            )


def cost_reserve(
    facts_of: StepFacts,
    step: Step,
    agent: Agent,
    params: BaseModel,
    owner: str,
    hard_seconds: float,
    held: Held | None = None,
) -> Reservation | None:
    """Reserve the worst case of the agent's call (its estimated input, its ``max_tokens`` out)
    against every ceiling that counts it; None when it calls no model or no ceiling is in force.
    A model the price table does not know fails closed; a refused reservation stops the step
    (and escalates at the tier that may raise a ceiling: raise it for this run and retry, or
    abort). ``held``: the answer to the reservation asked for in the batch that claimed the
    step (:func:`hold_for`), used when it covers this call; otherwise it is given back and the
    call reserves on its own. ``facts_of``: the policy in force and the step's facts, read only
    when the worst case depends on the input."""
    active = facts_of.active
    known = (
        call_worst(step, active)
        if type(agent).input_tokens_estimate is Agent.input_tokens_estimate
        else None
    )
    worst: Decimal | None
    if known is not None:  # the same answer as below, worked out once per kind of step
        scopes, worst = known.scopes, known.amount
    else:
        model = agent.call_model()
        if not model:
            return None
        scopes = ceilings_for(active.compiled, facts_of.facts)
        if not scopes:
            return None
        worst = price_cost(
            active.compiled, model, agent.input_tokens_estimate(params), agent.max_tokens
        )
    if worst is None:
        audit_record_alone(
            Entry(
                verb=Verb.COST_UNKNOWN,
                object_type="step",
                object_id=step.pk,
                run_id=step.run_id,
                step_id=step.pk,
                data={"agent": step.agent, "model": model},
            )
        )
        raise PolicyDenied(
            f"the cost of {step.agent!r} cannot be estimated: model {model!r} is not in the price table",
            code=Code.COST_UNKNOWN,
            detail={"model": model},
        )
    if held is not None and held.reservation is not None:
        if held.request.scopes == scopes and held.covers >= worst:
            warnings = held.warnings()
            if warnings:  # rare: once per scope and period
                with transaction.atomic():
                    audit_record_many(warnings, now=held.request.now)
            return held.reservation
        if held.reservation.kind != ReservationKind.BLOCK:  # a block is the chain's to settle
            ceiling_release(held.reservation.pk)  # the policy changed meanwhile: asked again
    try:
        return ceiling_reserve(
            scopes=scopes,
            amount=worst,
            run_id=step.run_id,
            step_id=step.pk,
            action=f"agent:{step.agent}",
            owner=owner[:200],
            ttl=timedelta(seconds=hard_seconds + 60),
        )
    except CeilingExceeded as exc:
        raise PolicyDenied(exc.message, code=Code.CEILING_EXCEEDED, detail=exc.detail) from exc


def cost_settlement(reservation: Reservation, ctx: AgentContext, agent: Agent) -> Settlement:
    """What settling the call's reservation writes (:func:`call_cost`). Written with the step's
    completion, or on its own."""
    return Settlement.of(reservation, call_cost(reservation.amount, ctx, agent))


def call_cost(reserved: Decimal, ctx: AgentContext, agent: Agent) -> Decimal | None:
    """What the call cost: its reported usage priced as the model the endpoint reports or, if
    the table does not know that name (a dated variant), the model the agent asked for; neither
    known, all that was ``reserved`` for it; no usage reported, None (nothing was spent: the
    money goes back)."""
    usage = ctx.usage
    if not (usage.prompt_tokens or usage.completion_tokens):
        return None
    active = active_policy()
    if active is not None:
        asked = agent.call_model()
        for model in (usage.model, asked) if usage.model != asked else (asked,):
            if not model:
                continue
            actual = price_cost(
                active.compiled, model, usage.prompt_tokens, usage.completion_tokens
            )
            if actual is not None:
                return actual
    return reserved


@dataclass(frozen=True, slots=True)
class CallWorst:
    """What a step's call may cost, known before its input: the ceilings that count it, its
    worst case, and how long it may take until its completion is written (its hard timeout
    and a minute: the life of its reservation)."""

    scopes: tuple[CeilingScope, ...]
    amount: Decimal
    span: timedelta


def call_worst(step: Step, active: ActivePolicy | None = None) -> CallWorst | None:
    """The worst case of ``step``'s call, for an agent whose estimate does not depend on its
    input (None: nothing to reserve, or not knowable before its input), under ``active`` (by
    default the policy in force)."""
    if step.kind not in (StepKind.AGENT, StepKind.ITEM):
        return None
    active = active or active_policy()
    if active is None:
        return None
    # A step is asked several times (its claim, its share of a block, its attempt): the answer
    # is kept on the step object for the compiled version that gave it.
    kept: tuple[CompiledPolicy, CallWorst | None] | None = step.__dict__.get(_WORST_ON_STEP)
    if kept is not None and kept[0] is active.compiled:
        return kept[1]
    _, agent, node, run_id, tenant_id, workflow, version = hint_of(step)
    worst = call_worst_of(agent, node, run_id, tenant_id, workflow, version, active=active)
    worst_keep(step, active, worst)
    return worst


#: Where :func:`call_worst` keeps its answer on a step object (with the compiled version).
_WORST_ON_STEP = "_policy_call_worst"


def worst_keep(step: Step, active: ActivePolicy, worst: CallWorst | None) -> None:
    """Keep ``worst`` on ``step`` as :func:`call_worst`'s answer under ``active`` (also from a
    claim that priced the step from its message's hint: the same values its row holds)."""
    step.__dict__[_WORST_ON_STEP] = (active.compiled, worst)


def worst_kept(step: Step, active: ActivePolicy) -> CallWorst | None:
    """What :func:`call_worst` answered for ``step`` under ``active``, if it was asked (None:
    not asked, asked under another version, or nothing to reserve)."""
    kept: tuple[CompiledPolicy, CallWorst | None] | None = step.__dict__.get(_WORST_ON_STEP)
    return kept[1] if kept is not None and kept[0] is active.compiled else None


def call_worst_of(
    agent: str,
    node: str,
    run_id: int,
    tenant_id: int,
    workflow: str,
    version: int,
    *,
    active: ActivePolicy | None = None,
) -> CallWorst | None:
    """:func:`call_worst` of an agent or item step, from the only values it reads. All but the
    run's key is the same for every run of a workflow version's node under one policy version
    and tenant, so it is worked out once (:class:`_WorstShapes`) and only the run's key is
    filled in per call (a priced step asks when it is claimed and again when it runs)."""
    active = active or active_policy()
    if active is None:
        return None
    instance = agent_instance(agent)  # one per process, of the agent's registered class
    cls, model = type(instance), instance.call_model()
    # By the tenant's id, which names the same tenant as its slug for its whole life.
    shape = _worst_shapes.get(
        active.compiled, (cls, model, agent, node, tenant_id, workflow, version)
    )
    if shape is None:
        return None
    scopes = shape.scopes
    if scopes[0].scope == "run":
        scopes = _worst_shapes.for_run(shape, run_id)
    return CallWorst(scopes, shape.amount, shape.span)


class _WorstShapes:
    """:func:`call_worst_of`'s answers per compiled policy version, with the run's key left
    empty; bounded, and dropped whole when the version in force changes."""

    SIZE = 4096

    def __init__(self) -> None:
        self.policy: CompiledPolicy | None = None
        self.shapes: dict[tuple[Any, ...], CallWorst | None] = {}
        #: The last shape filled in for a run, and its scopes: a run's steps ask in turn, and
        #: the same tuple compares equal to itself without comparing each ceiling.
        self.last_run: tuple[CallWorst, int, tuple[CeilingScope, ...]] | None = None

    def for_run(self, shape: CallWorst, run_id: int) -> tuple[CeilingScope, ...]:
        """``shape``'s scopes with its run ceiling's key filled in for ``run_id``."""
        last = self.last_run  # read once: another thread may replace it meanwhile
        if last is not None and last[0] is shape and last[1] == run_id:
            return last[2]
        run, *rest = shape.scopes
        scopes = (CeilingScope("run", str(run_id), run.limit, run.soft_ratio), *rest)
        self.last_run = (shape, run_id, scopes)
        return scopes

    def get(self, policy: CompiledPolicy, key: tuple[Any, ...]) -> CallWorst | None:
        if policy is not self.policy:
            self.policy, self.shapes = policy, {}
        try:
            return self.shapes[key]
        except KeyError:
            pass
        if len(self.shapes) >= self.SIZE:
            self.shapes.clear()
        cls, model, agent, node, tenant_id, workflow, version = key
        shape = self.shapes[key] = _worst_shape(
            policy, cls, model, agent, node, tenant_by_id(tenant_id).slug, workflow, version
        )
        return shape


_worst_shapes = _WorstShapes()


def _worst_shape(
    policy: CompiledPolicy,
    cls: type[Agent],
    model: str,
    agent: str,
    node: str,
    tenant: str,
    workflow: str,
    version: int,
) -> CallWorst | None:
    if cls.input_tokens_estimate is not Agent.input_tokens_estimate:
        return None  # its estimate reads its input, which its claim does not know yet
    if not model:
        return None
    scopes = ceilings_of(  # what ceilings_for reads of the step's facts (policy_facts)
        policy, workflow=workflow, agent=agent, tenant=tenant, run_id=0
    )
    if not scopes:
        return None
    worst = price_cost(policy, model, cls.estimated_input_tokens, cls.max_tokens)
    if worst is None:
        return None  # the step fails closed when it runs
    wf = workflow_get(workflow, version)
    _, hard = wf.timeouts_of(wf.node(node))
    return CallWorst(scopes, worst, hard + timedelta(seconds=60))


def hold_for(
    step: Step,
    worker_id: str,
    now: datetime,
    *,
    queued: bool = False,
    worst: CallWorst | None = None,
) -> HoldRequest | None:
    """The reservation to ask for in the transaction that claims ``step`` for ``worker_id``
    (None: nothing to reserve, or not knowable before its input): the same worst case the step
    would reserve when it runs (``worst``, if the caller has it: :func:`call_worst`). The
    batch makes it only if the step is then running under this worker; the step takes it when
    it runs (:func:`cost_reserve`), or it is given back. ``queued``: asked for in the batch
    that inserts ``step`` unclaimed (a sibling this worker means to run later), so without
    that condition."""
    worst = worst or call_worst(step)
    if worst is None:
        return None
    return _hold_request(worst, step.run_id, step.id, step.agent, worker_id, now, queued=queued)


def _hold_request(
    worst: CallWorst,
    run_id: int,
    step_id: int,
    agent: str,
    worker_id: str,
    now: datetime,
    *,
    queued: bool,
) -> HoldRequest:
    """The call's :class:`HoldRequest`, built field by field: ``worst`` comes from the compiled
    policy (its scopes one per kind, its amount priced to the ledger's places, its span
    positive), so of :func:`policies.ledger.hold_request`'s checks only the lengths are left."""
    action = f"agent:{agent}"
    guard = "" if queued else _running_guard()
    guard_params = () if queued else (step_id, _RUNNING, worker_id)
    guard_types = () if queued else _GUARD_TYPES
    if len(action) > 200 or timezone.is_naive(now):  # checked there (refused, with its message)
        return hold_request(
            scopes=worst.scopes,
            amount=worst.amount,
            run_id=run_id,
            step_id=step_id,
            action=action,
            owner=worker_id[:200],
            ttl=worst.span,
            now=now,
            guard=guard,
            guard_params=guard_params,
            guard_types=guard_types,
        )
    return HoldRequest(
        worst.scopes,
        periods_of(worst.scopes, now),
        worst.amount,
        run_id,
        step_id,
        action,
        worker_id[:200],
        now + worst.span,
        now,
        guard,
        guard_params,
        guard_types,
        _CALL_KIND,
        None,
    )


_RUNNING = StepStatus.RUNNING.value
_GUARD_TYPES = ("bigint", "text", "text")
_CALL_KIND = ReservationKind.CALL.value


def hold_for_hint(
    hint: list[Any], step_id: int, worker_id: str, now: datetime
) -> tuple[HoldRequest, CallWorst, ActivePolicy] | None:
    """:func:`hold_for` the step a wake-up message names, from the message's hint
    (``orchestration.dispatch.wake_hint``) rather than its row, which its claim reads: so the
    reservation goes in the claim's own transaction. Returns it with the worst case it asks
    for and the policy that priced it (:func:`worst_keep`, once the step is claimed). None for
    a hint it cannot read."""
    try:
        kind, agent, node, run_id, tenant_id, workflow, version = hint
        if kind not in (StepKind.AGENT, StepKind.ITEM):
            return None
        active = active_policy()
        if active is None:
            return None
        run_id = int(run_id)
        worst = call_worst_of(
            str(agent),
            str(node),
            run_id,
            int(tenant_id),
            str(workflow),
            int(version),
            active=active,
        )
        if worst is None:
            return None
        request = _hold_request(worst, run_id, step_id, str(agent), worker_id, now, queued=False)
        return request, worst, active
    except Exception:  # an old or foreign message: the step reserves as it would without one
        return None


def block_of(request: HoldRequest) -> HoldRequest:
    """``request`` (a call's) as a budget block for it and the run's next calls in this worker
    (``policies.blocks``): ``CEILING_BLOCK_CALLS`` times its worst case where that leaves every
    ceiling under its soft threshold, else its own, living as long as that many such calls may
    take. Unchanged when blocks are off (1)."""
    calls = settings.SIGNALBOX["CEILING_BLOCK_CALLS"]
    if calls <= 1 or request.kind != ReservationKind.CALL:
        return request
    r = request  # built field by field: ``dataclasses.replace`` costs three times as much
    return HoldRequest(
        r.scopes,
        r.periods,
        r.amount,
        r.run_id,
        r.step_id,
        r.action,
        r.owner,
        r.now + (r.expires_at - r.now) * calls,
        r.now,
        r.guard,
        r.guard_params,
        r.guard_types,
        _BLOCK,
        r.amount * calls,
    )


_BLOCK = ReservationKind.BLOCK.value


@cache
def _running_guard() -> str:
    """The hold's condition: the step is running under the worker that asked."""
    qn = connection.ops.quote_name
    return (
        f"EXISTS (SELECT 1 FROM {qn(Step._meta.db_table)} WHERE {qn('id')} = {{0}} "
        f"AND {qn('status')} = {{1}}{BY_KEY} AND {qn('lease_owner')} = {{2}})"
    )
