"""One attempt of a claimed step: build its input from run state, run its agent outside any
transaction, check its output against the contracts, then hand the outcome to
``orchestration.worker.complete``."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from orchestration.advance import approval_digest, node_of, output_contract, step_action, step_input
from orchestration.agents.base import AgentContext, StateView
from orchestration.contracts import validation_errors
from orchestration.errors import (
    Code,
    ContractViolation,
    PolicyDenied,
    SignalboxError,
    TransientError,
)
from orchestration.leases import interrupt_after
from orchestration.models import Step, StepKind
from orchestration.payloads import payload_size
from orchestration.registry import agent_instance, workflow_get
from orchestration.runtime import Runtime
from orchestration.worker import complete
from orchestration.worker.chain import Chain, Completion
from orchestration.worker.costs import (
    call_cost,
    cost_reserve,
    cost_settlement,
    policy_facts,
    rate_limit_check,
    step_facts,
)
from policies.active import active_policy
from policies.evaluate import Decision, policy_decide
from policies.ledger import Settlement, settlement_apply
from policies.models import Reservation, ReservationKind

log = logging.getLogger(__name__)


class StepTools:
    """A step's door to the tool registry: fills in run, step, node key and call index, so a
    retried or re-claimed step reuses its idempotency keys. The client is made on first use."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.calls = 0
        self._client: Any = None
        #: The policy's decisions about this attempt's tool calls, written with its outcome.
        self.decisions: list[Decision] = []

    def call(self, capability: str, params: Any) -> Any:
        from orchestration.tools.client import ToolClient

        as_dict = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
        found = policy_facts(
            self.step, f"tool:{capability}", as_dict if isinstance(as_dict, dict) else {}
        )
        if found is not None:
            active, facts = found
            decision = policy_decide(active.compiled, facts, timezone.now())
            self.decisions.append(decision)
            if decision.outcome != "allow":
                # Inside an attempt nothing can pause for a person: the step stops here and
                # escalates, its context saying what the policy asked (the same action as a
                # step of its own is what an approval or a window can wait for).
                raise PolicyDenied(
                    f"policy {decision.rule} ({decision.outcome.replace('_', ' ')}): {decision.reason}",
                    code=Code.POLICY_DENIED,
                    detail=decision.to_json(),
                )
            rate_limit_check(active, facts)
        if self._client is None:
            self._client = ToolClient(actor_id=self.step.agent)
        self.calls += 1
        run = self.step.run
        return self._client.call(
            capability,
            params,
            run_id=run.pk,
            step_id=self.step.pk,
            node=self.step.key,
            call_index=self.calls,
            trace_id=run.trace_id,
        )

    def take_records(self) -> tuple[list[Any], list[Any], list[Decision]]:
        """The ToolCall rows, audit entries and policy decisions to write in the step's own
        transaction."""
        decisions, self.decisions = self.decisions, []
        if self._client is None:
            return [], [], decisions
        records, entries = self._client.records, self._client.audit_entries
        self._client.records, self._client.audit_entries = [], []
        return records, entries, decisions


def step_run(step: Step, *, rt: Runtime, worker_id: str, chain: Chain | None = None) -> Step | None:
    """Run a claimed step's agent and commit the outcome; returns the successor this worker
    claimed for itself, if any. With a ``chain``, ``step`` may have been started ahead of its
    predecessor's commit, and its own completion may still be in flight when this returns."""

    def settle() -> None:
        if chain is not None:
            chain.settle(step)

    #: The call's reservation, to settle: with the completion, or on its own if the attempt fails.
    unsettled: list[Settlement] = []

    def held() -> Any:
        """The answer to the reservation asked for in the batch that claimed this step (read
        after ``settle``), taken once; None if none was asked."""
        return chain.take_held(step) if chain is not None else None

    def give_back() -> None:
        """The reservation asked for the step goes back unused (a block's share: to its block)."""
        if chain is not None:
            chain.unused(step.pk, held())

    def settlement_of(reservation: Reservation, ctx: AgentContext) -> Settlement:
        """What the call cost, as its reservation's settlement or, taken from a budget block,
        as its record against the block."""
        if reservation.kind == ReservationKind.BLOCK and chain is not None:
            return chain.spend(step, lambda worst: call_cost(worst, ctx, agent))
        return cost_settlement(reservation, ctx, agent)

    def fail(error: SignalboxError, **kwargs: Any) -> None:
        settle()
        give_back()
        while unsettled:
            settlement_apply(unsettled.pop())
        complete.attempt_fail(step, error, rt=rt, worker_id=worker_id, **kwargs)

    run = step.run
    wf = workflow_get(run.workflow_name, run.workflow_version)
    node = node_of(wf, step)
    agent = agent_instance(step.agent)
    cls = type(agent)
    soft, hard = wf.timeouts_of(node)
    if not cls.pure:
        settle()  # its effects may begin at once: the commit that made the step ready comes first

    # An approved step executes only the exact action approved (by the node's gate or the
    # policy), under the policy version that asked for the approval; a gated step never
    # executes unapproved.
    gated = node.approval is not None and node.approval.required(run.state)
    if step.kind == StepKind.AGENT and (step.approved_digest or gated):
        action = step_action(step, node, run)
        active = active_policy()
        if (
            approval_digest(action, active.number if active is not None else None)
            != step.approved_digest
        ):
            settle()
            give_back()
            complete.approval_reopen(step, action, rt=rt, worker_id=worker_id)
            return None

    raw: Any = None
    try:
        raw = step.input = step_input(step, node, run)
        params = cls.Input.model_validate(raw)
    except ValidationError as exc:
        fail(
            ContractViolation(
                f"input for {step.agent!r} does not satisfy its contract",
                code=Code.INPUT_CONTRACT,
                detail=validation_errors(exc),
            ),
            payload=raw,
        )
        return None
    except SignalboxError as exc:
        fail(exc)
        return None

    reservation: Reservation | None = None
    #: A pure agent whose reservation was asked for in the batch still in flight runs at once;
    #: the answer is read after it (before its completion), and a refusal drops its result.
    deferred = None
    if step.kind in (StepKind.AGENT, StepKind.ITEM):
        facts = step_facts(step, raw if isinstance(raw, dict) else {})
        if facts is not None:
            try:
                facts.rate_limit_check()
                # Taken from the run's budget block when it was claimed, under the policy in
                # force: the block answers for it, and there is nothing to ask.
                reservation = chain.shared(step, facts.active) if chain is not None else None
                if reservation is None:
                    if cls.pure and chain is not None and chain.hold_ahead(step):
                        deferred = facts
                    else:
                        reservation = cost_reserve(
                            facts, step, agent, params, worker_id, hard.total_seconds(), held()
                        )
            except SignalboxError as exc:
                fail(exc)
                return None

    own_state = step.kind in (StepKind.AGENT, StepKind.ROUTE)
    ctx = AgentContext(
        run_id=run.pk,
        step_key=step.key,
        attempt=step.attempt,
        state=StateView(
            run.state if step.kind != StepKind.COMPENSATE else {},
            reads=node.reads if step.kind != StepKind.COMPENSATE else frozenset(),
            writes=node.writes if own_state else frozenset(),
        ),
        seed=run.seed,
        trace_id=run.trace_id,
        time_scale=settings.SIGNALBOX["AGENT_TIME_SCALE"],
        tools=(tools := StepTools(step)),
        soft_deadline=time.monotonic() + soft.total_seconds(),
        before_acting=settle,
        max_tokens=cls.max_tokens if reservation is not None or deferred is not None else None,
    )
    result: Any = None
    keeper = rt.leases(
        on_hard_timeout=lambda step_id, token, owner: complete.hard_timeout(
            step_id, token, owner, rt=rt
        )
    )
    with keeper.hold(step.pk, step.attempt, worker_id, hard_after=hard.total_seconds()):
        try:
            try:
                with interrupt_after(soft.total_seconds()):
                    result = agent.run(params, ctx)
            finally:
                if reservation is not None:
                    unsettled.append(settlement_of(reservation, ctx))
        except SignalboxError as exc:
            fail(exc, records=tools.take_records())
            return None
        except Exception as exc:  # unknown agent exceptions are retried, then recorded
            log.warning("agent %s raised", step.agent, exc_info=True)
            fail(
                TransientError(f"{type(exc).__name__}: {exc}", code=Code.AGENT_EXCEPTION),
                records=tools.take_records(),
            )
            return None

    if deferred is not None:
        settle()  # the batch that asked for the reservation: read now
        try:
            reservation = cost_reserve(
                deferred, step, agent, params, worker_id, hard.total_seconds(), held()
            )
        except SignalboxError as exc:
            fail(exc, records=tools.take_records())
            return None
        if reservation is not None:
            unsettled.append(settlement_of(reservation, ctx))
    output: Any = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    contract = output_contract(step, node)
    try:
        if contract is not cls.Output:  # a fallback agent: its own contract, then the node's
            output = cls.Output.model_validate(output).model_dump(mode="json")
        output = contract.model_validate(output).model_dump(mode="json")
    except ValidationError as exc:
        fail(
            ContractViolation(
                f"output of {step.agent!r} does not satisfy its contract",
                code=Code.OUTPUT_CONTRACT,
                detail=validation_errors(exc),
            ),
            payload=output,
            records=tools.take_records(),
        )
        return None
    size = payload_size(output)
    limit = settings.SIGNALBOX["MAX_PAYLOAD_BYTES"]
    if size > limit:
        fail(
            ContractViolation(
                f"output of {step.agent!r} is {size} bytes; the limit is {limit}",
                code=Code.PAYLOAD_TOO_LARGE,
            ),
            payload=output,
            records=tools.take_records(),
        )
        return None
    step.input = raw
    done = Completion.now_from(
        step,
        output,
        ctx.state.written,
        ctx.usage.as_dict(),
        tools.take_records(),
        ctx.degraded,
        settlement=unsettled.pop() if unsettled else None,  # written with the completion
    )
    try:
        return complete.step_complete(done, rt=rt, worker_id=worker_id, chain=chain)
    except Exception as exc:  # the commit failed (database gone, a bug): retried, then bounded
        settle()
        complete.commit_failed(done, exc, rt=rt, worker_id=worker_id)
        return None
