"""How steps and runs end badly: cancelling, failing, undoing completed side effects (the saga),
and the recovery tiers after a failed attempt (fallback, degraded result, escalation)."""

from __future__ import annotations

from typing import Any

from audit.verbs import Verb
from infra.canonical import digest
from infra.sql import unsaved
from orchestration import compensation, failures, graph
from orchestration.advance.actions import node_of, output_contract, tool_call_summary
from orchestration.advance.state import AdvanceState
from orchestration.changes import (
    ACTIVE_STEPS,
    DONE_STEPS,
    OPEN_WAITS,
)
from orchestration.compensation import UNDO
from orchestration.definition import FAIL, Failure, Node
from orchestration.errors import ErrorClass, SignalboxError
from orchestration.models import (
    STEP_ACTIVE,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Wait,
    WaitKind,
    WaitStatus,
)
from orchestration.registry import agent_class


class Ending(AdvanceState):
    """How a step or a run ends badly, in an advance."""

    def cancel_step(self, step: Step, *, reason: str) -> None:
        self.move(
            step, StepStatus.CANCELLED, finished_at=self.now, lease_owner="", error_message=reason
        )
        self.record(Verb.STEP_CANCELLED, "step", step, step=step, reason=reason)
        open_waits = [
            *self.snapshot.open_waits(step),
            *(w for w in self.changes.new_waits if w.step is step),
        ]
        for wait in open_waits:
            if wait.status != WaitStatus.OPEN:
                continue
            self.update_wait(wait, status=WaitStatus.CANCELLED, decided_at=self.now)
            self.record(Verb.WAIT_CANCELLED, "wait", wait, step=step)

    def fail_run(
        self, code: str, message: str, *, step: Step | None = None, verb: Verb = Verb.RUN_FAILED
    ) -> None:
        """Stop the run: cancel what is still active and record why. Completed steps that
        declared a compensation are undone first, newest first; the run ends after them."""
        if self.run.is_terminal:
            return
        if self.run.status == RunStatus.COMPENSATING:
            self.stop_compensating(code, message, step=step)
            return
        self.snapshot.require(ACTIVE_STEPS, OPEN_WAITS, DONE_STEPS)
        self.announce_steps()
        for other in self.steps_now(*STEP_ACTIVE):
            if step is not None and (
                other is step or (step.pk is not None and other.pk == step.pk)
            ):
                continue
            self.cancel_step(other, reason=f"run ended: {code}")
        self.run.pending_joins = {}
        self.run.error_code = code
        self.run.error_message = message
        self.record(verb, "run", self.run, step=step, code=code, message=message)
        if not self._start_compensation(step, message):
            self._end(compensation.final_status(code))

    def _end(self, status: str) -> None:
        self.run.status = status
        self.run.finished_at = self.now

    # --- compensation (saga) --------------------------------------------------------------------

    def _start_compensation(self, trigger: Step | None, reason: str) -> bool:
        """Create one compensation step per completed step whose node declares ``compensate``,
        newest first; the first is queued, the rest wait their turn. False if there are none."""
        done = [
            s
            for s in self.steps_now(StepStatus.SUCCEEDED)
            if s.kind in (StepKind.AGENT, StepKind.ITEM)
        ]
        completed = (
            trigger is not None
            and trigger.status == StepStatus.SUCCEEDED
            and trigger.kind in (StepKind.AGENT, StepKind.ITEM)
        )
        ordered = compensation.newest_first(
            [s for s in done if s is not trigger], trigger if completed else None
        )
        plan = compensation.compensations(
            self.wf, [s for s in ordered if s.kind != StepKind.COMPENSATE]
        )
        if not plan:
            return False
        for undo in plan:
            original: Step = undo.original
            comp = agent_class(undo.agent)
            step = unsaved(
                Step,
                run=self.run,
                node=compensation.undo_node_name(original.node),
                visit=original.visit,
                item=original.item,
                kind=StepKind.COMPENSATE,
                agent=undo.agent,
                pool=undo.node.pool or comp.pool,
                parent=original,
                status=StepStatus.QUEUED if undo.queued else StepStatus.PENDING,
                max_attempts=comp.max_attempts or self.wf.default_max_attempts,
                input=compensation.compensation_input(
                    original.key, original.input, original.output, reason
                ),
                available_at=self.now,
                created_at=self.now,
            )
            if undo.queued:
                step.published_at = self.now
                self.queue(step)
            self._entered(step.status)
            # Counted, but never refused by max_steps: undoing is bounded by what was done.
            self.run.step_count += 1
            self.changes.new_steps.append(step)
        self.run.status = RunStatus.COMPENSATING
        keys = [undo.original.key for undo in plan]
        self.record(
            Verb.RUN_COMPENSATING,
            "run",
            self.run,
            step=trigger,
            steps=keys,
            outcome=compensation.final_status(self.run.error_code),
        )
        self.run.notes = [
            *self.run.notes,
            f"compensating {len(plan)} completed step(s): {', '.join(keys)}",
        ]
        return True

    def _compensated(self, step: Step) -> None:
        """A compensation finished: release the next one, or end the run after the last."""
        self.record(
            Verb.STEP_COMPENSATED,
            "step",
            step.parent_id,
            step=step,
            undone=step.key.removeprefix(UNDO),
        )
        pending = [s for s in self.steps_now(StepStatus.PENDING) if s.kind == StepKind.COMPENSATE]
        if pending:
            following = pending[0]
            self.move(following, StepStatus.QUEUED, available_at=self.now, published_at=self.now)
            self.queue(following)
            return
        if self.run.active_steps == 0:
            self._finish_compensation()

    def _finish_compensation(self, note: str = "") -> None:
        final = compensation.final_status(self.run.error_code)
        self._end(final)
        if note:
            self.run.notes = [*self.run.notes, note]
        self.record(Verb.RUN_COMPENSATED, "run", self.run, outcome=final, note=note)

    def stop_compensating(self, code: str, message: str, *, step: Step | None = None) -> None:
        """An operator aborted (or a bound ended) the compensations: the rest are cancelled."""
        self.snapshot.require(ACTIVE_STEPS, OPEN_WAITS)
        self.announce_steps()
        for other in self.steps_now(*STEP_ACTIVE):
            if step is not None and (
                other is step or (step.pk is not None and other.pk == step.pk)
            ):
                continue
            self.cancel_step(other, reason=f"compensation stopped: {code}")
        self.run.error_message = f"{self.run.error_message}; compensation stopped: {message}"
        self._finish_compensation(note=f"compensation stopped ({code}): {message}")

    def fail_step(self, step: Step, error: SignalboxError, *, payload: Any = None) -> None:
        """A step failed for good: record the error (and the offending payload) and fail the run."""
        self.move(
            step,
            StepStatus.FAILED,
            error_class=error.error_class,
            error_code=error.code,
            error_message=error.message,
            error_detail=failures.error_detail(error, payload),
            finished_at=self.now,
            lease_owner="",
        )
        verb = (
            Verb.STEP_CONTRACT_VIOLATION
            if error.error_class == ErrorClass.CONTRACT
            else Verb.STEP_FAILED
        )
        self.record(
            verb,
            "step",
            step,
            step=step,
            payload=payload,
            code=error.code,
            message=error.message,
            error_class=error.error_class,
        )
        if error.error_class == ErrorClass.LIMIT:
            self.record(
                Verb.RUN_LIMIT_HIT, "run", self.run, step=step, code=error.code, detail=error.detail
            )
        self.fail_run(error.code, f"{step.key}: {error.message}", step=step)

    # --- recovery tiers 2 to 4 ------------------------------------------------------------------

    def step_exhausted(self, step: Step, error: SignalboxError, *, payload: Any = None) -> None:
        """An attempt failed and is not retried: hand the step to the node's fallback agent,
        else continue with its declared degraded result, else escalate it to an operator or
        fail the run, as the node declares. Compensations always escalate."""
        node = node_of(self.wf, step)
        is_compensation = step.kind == StepKind.COMPENSATE
        tried = failures.agents_tried(step.attempts_log, step.agent)
        failure = Failure(
            step_key=step.key,
            agent=step.agent,
            code=error.code,
            message=error.message,
            error_class=str(error.error_class),
            attempts=len(step.attempts_log),
            agents_tried=tuple(tried),
            input=step.input,
        )
        tier = failures.exhausted(
            self.wf,
            node,
            compensation=is_compensation,
            failure=failure,
            tried=tried,
            contract=output_contract(step, node),
            error=error,
        )
        if isinstance(tier, failures.FallBack):
            self.fall_back(step, node, tier.agent, error)
        elif isinstance(tier, failures.Degrade):
            self.degrade(step, node, tier.output, tier.reason, error)
        elif isinstance(tier, failures.Escalate):
            self.escalate(step, node, tier.error, payload=payload)
        else:
            self.fail_step(step, tier.error, payload=payload)

    def fall_back(self, step: Step, node: Node, agent: str, error: SignalboxError) -> None:
        """Tier 2: the node's fallback agent takes the step, with attempts of its own."""
        fallback = agent_class(agent)
        previous = step.agent
        self.move(
            step,
            StepStatus.QUEUED,
            agent=agent,
            pool=node.pool or fallback.pool,
            failures=0,
            max_attempts=self.attempts_bound(fallback.max_attempts or self.wf.default_max_attempts),
            lease_owner="",
            lease_expires_at=None,
            available_at=self.now,
            published_at=self.now,
            error_class=error.error_class,
            error_code=error.code,
            error_message=error.message,
        )
        self.queue(step)
        self.record(
            Verb.STEP_FALLBACK,
            "step",
            step,
            step=step,
            from_agent=previous,
            to_agent=agent,
            code=error.code,
            message=error.message,
        )

    def degrade(
        self, step: Step, node: Node, output: dict[str, Any], reason: str, error: SignalboxError
    ) -> None:
        """Tier 3: the run continues with the node's declared degraded result."""
        self.move(
            step,
            StepStatus.SUCCEEDED,
            output=output,
            finished_at=self.now,
            lease_owner="",
            lease_expires_at=None,
            degraded=reason[:500],
            error_class=error.error_class,
            error_code=error.code,
            error_message=error.message,
        )
        self.note_degraded(step, reason)
        self.step_succeeded(step, node, output, {})

    def note_degraded(self, step: Step, reason: str) -> None:
        """Make a degraded result visible on the run (its notes and ``degraded`` list)."""
        self.run.degraded = [*self.run.degraded, {"step": step.key, "reason": reason}]
        self.run.notes = [*self.run.notes, f"{step.key}: degraded: {reason}"]
        self.record(Verb.STEP_DEGRADED, "step", step, step=step, reason=reason)

    def escalate(
        self, step: Step, node: Node, error: SignalboxError, *, payload: Any = None
    ) -> Wait:
        """Tier 4: the step waits for an operator, who sees every attempt, error, provider and
        agent tried, and may retry it, skip it with a value, or abort the run."""
        earlier = self.snapshot.tool_calls()
        current = [c for c in self.changes.tool_calls if c.step_id == step.pk]
        context = failures.escalation_context(
            step_key=step.key,
            node=node,
            kind=step.kind,
            agent=step.agent,
            compensation=step.kind == StepKind.COMPENSATE,
            tried=failures.agents_tried(step.attempts_log, step.agent),
            error=error,
            attempts=step.attempts_log,
            tool_calls=[tool_call_summary(c) for c in (*earlier, *current)],
            step_input=step.input,
            payload=payload,
            contract=output_contract(step, node),
        )
        self.move(
            step,
            StepStatus.WAITING,
            lease_owner="",
            lease_expires_at=None,
            error_class=error.error_class,
            error_code=error.code,
            error_message=error.message,
            error_detail=failures.error_detail(error, payload),
            input=step.input,
        )
        wait = unsaved(
            Wait,
            run=self.run,
            tenant_id=self.run.tenant_id,
            step=step,
            kind=WaitKind.ESCALATION,
            name=step.key,
            tier=self.run.drill_tier if self.run.is_drill else failures.escalation_tier(error),
            reason=f"{context['why']}: {error.message}"[:2000],
            action=context,
            action_digest=digest(context),
            deadline_at=graph.escalation_deadline(self.wf, node, self.now),
            on_timeout=FAIL,
            created_at=self.now,
        )
        self.changes.new_waits.append(wait)
        verb = (
            Verb.STEP_CONTRACT_VIOLATION
            if error.error_class == ErrorClass.CONTRACT
            else Verb.STEP_FAILED
        )
        self.record(
            verb,
            "step",
            step,
            step=step,
            payload=payload,
            code=error.code,
            message=error.message,
            error_class=error.error_class,
        )
        self.record(
            Verb.STEP_ESCALATED, "step", step, step=step, code=error.code, why=context["why"]
        )
        return wait

    # --- the end of an advance ------------------------------------------------------------------
