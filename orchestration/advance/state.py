"""The working state of an advance: the run row, the snapshot, the changes collected so far,
and the bookkeeping every part of an advance shares (records, counters, new steps, the run's
status at the end)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from audit.verbs import ActorType, Verb
from infra.sql import unsaved
from orchestration import graph
from orchestration.changes import (
    ACTIVE_STEPS,
    DONE_STEPS,
    Changes,
    Record,
    Snapshot,
    Wakeup,
)
from orchestration.definition import Node, Workflow
from orchestration.models import (
    STEP_ACTIVE,
    RunStatus,
    StateVersion,
    Step,
    StepKind,
    StepStatus,
    Wait,
)
from orchestration.registry import agent_class, workflow_get
from policies.document import Bounds
from policies.evaluate import Decision, policy_decide
from policies.facts import Facts


class AdvanceState:
    """The working state of one advance of one run: the run row (changed in place), what was
    loaded, and the changes collected so far; the records, counters and new steps that every
    part of an advance uses."""

    def __init__(
        self,
        snapshot: Snapshot,
        now: datetime,
        *,
        actor_type: str = ActorType.SYSTEM,
        actor_id: str = "",
        worker_id: str = "",
        local_pools: frozenset[str] = frozenset(),
        hold_handoffs: bool = False,
        lease_seconds: float = 30.0,
        insert_run: bool = False,
        optimistic: bool = False,
    ) -> None:
        self.snapshot = snapshot
        self.run = run = snapshot.run
        self.wf: Workflow = workflow_get(run.workflow_name, run.workflow_version)
        self.now = now
        self.actor_type = actor_type
        self.actor_id = actor_id
        self.worker_id = worker_id
        self.local_pools = local_pools
        #: Hand-offs into pools this worker serves are held back (it will likely claim them).
        self.hold_handoffs = hold_handoffs
        self.lease_seconds = lease_seconds
        self.changes = Changes(
            run=run,
            now=now,
            insert_run=insert_run,
            expected_version=run.version if optimistic else None,
        )
        # A new run's status is news too: the run list and home show it as soon as it is queued.
        self._status_before = "" if insert_run else run.status
        #: New steps whose "created" record and live event are written (in creation order).
        self._announced = 0
        self._waits_announced = 0

    # --- recording ------------------------------------------------------------------------------

    def record(
        self, verb: Verb, obj: str, obj_id: Any, *, step: Step | None = None, **data: Any
    ) -> None:
        self.changes.audit.append(
            Record(
                verb=verb,
                object_type=obj,
                obj=obj_id,
                step=step,
                actor_type=data.pop("actor_type", self.actor_type),
                actor_id=data.pop("actor_id", self.actor_id),
                payload=data.pop("payload", None),
                data=data,
            )
        )

    def step_event(self, step: Step, change: str) -> None:
        self.changes.live.append(
            {"kind": "step", "change": change, "step": step, "key": step.key, "status": step.status}
        )

    # --- state ----------------------------------------------------------------------------------

    def write_state(self, key: str, value: Any, *, writer: str, step: Step | None) -> None:
        versions = self.run.state_versions
        version = int(versions.get(key, 0)) + 1
        versions[key] = version
        self.run.state[key] = value
        self.changes.state_versions.append(
            unsaved(
                StateVersion,
                run=self.run,
                key=key,
                version=version,
                value=value,
                step=step,
                writer=writer,
                created_at=self.now,
            )
        )
        self.record(
            Verb.STATE_WRITTEN,
            "state",
            f"{key}@{version}",
            step=step,
            payload=value,
            key=key,
            version=version,
        )

    # --- steps and their counters on the run row ------------------------------------------------

    def _entered(self, status: str) -> None:
        if status in STEP_ACTIVE:
            self.run.active_steps += 1
        if status == StepStatus.WAITING:
            self.run.waiting_steps += 1

    def _left(self, status: str) -> None:
        if status in STEP_ACTIVE:
            self.run.active_steps -= 1
        if status == StepStatus.WAITING:
            self.run.waiting_steps -= 1

    def move(self, step: Step, status: str, **fields: Any) -> None:
        """Change a step's status (and fields) and keep the run's counters true."""
        self._left(step.status)
        self._entered(status)
        step.status = status
        for name, value in fields.items():
            setattr(step, name, value)
        self.changes.update_step(step, status=status, **fields)
        self.step_event(step, status)

    def queue(self, step: Step, delay: float = 0.0) -> None:
        """Wake a worker for ``step`` after commit (held a moment if this worker may take it)."""
        wakeup = Wakeup(step, delay)
        if delay == 0 and self.hold_handoffs and step.pool in self.local_pools:
            self.changes.held.append(wakeup)
        else:
            self.changes.wakeups.append(wakeup)

    def _default_attempts(self, node: Node) -> int:
        if node.agent:
            return agent_class(node.agent).max_attempts or self.wf.default_max_attempts
        return 1

    @property
    def bounds(self) -> Bounds | None:
        """The policy's bounds on this workflow's runs (None: no policy is in force)."""
        active = self.snapshot.policy
        return active.bounds(self.wf.name) if active is not None else None

    def attempts_bound(self, attempts: int) -> int:
        """``attempts`` within the policy's ``max_retries`` (the stricter of the two wins)."""
        bounds = self.bounds
        if bounds is None or bounds.max_retries is None:
            return attempts
        return min(attempts, bounds.max_retries + 1)

    def new_step(
        self,
        node: Node,
        *,
        kind: str,
        status: str,
        visit: int,
        item: int = -1,
        deferred_until: datetime | None = None,
        **fields: Any,
    ) -> Step:
        """A new step of ``node``; ``deferred_until``: queued, but not to run (nor be woken)
        before then."""
        graph.step_bound_check(self.wf, self.run.step_count)
        self.run.step_count += 1
        pool = ""
        if kind in (StepKind.AGENT, StepKind.ITEM):
            pool = node.pool or agent_class(node.agent).pool
        step = unsaved(
            Step,
            run=self.run,
            node=node.name,
            visit=visit,
            item=item,
            kind=kind,
            agent=node.agent,
            pool=pool,
            status=status,
            max_attempts=self.attempts_bound(node.max_attempts or self._default_attempts(node)),
            available_at=deferred_until or self.now,
            created_at=self.now,
            **fields,
        )
        if deferred_until is not None:
            self._entered(step.status)
            self.changes.new_steps.append(step)  # its wake-up is the reaper's, when it is due
            return step
        self._add_step(step)
        return step

    # --- policy -----------------------------------------------------------------------------

    def policy_decide(self, node: Node, params: Mapping[str, Any]) -> Decision | None:
        """What the policy in force says about ``node``'s agent acting with ``params`` (None:
        no policy is in force)."""
        active = self.snapshot.policy
        tenant = self.snapshot.tenant
        if active is None or tenant is None:
            return None
        facts = Facts(
            action=f"agent:{node.agent}",
            workflow=self.run.workflow_name,
            node=node.name,
            tenant=tenant.slug,
            tenant_time_zone=tenant.time_zone,
            agent=node.agent,
            params=params,
            run_id=self.run.pk,
        )
        return policy_decide(active.compiled, facts, self.now)

    def note_decision(self, decision: Decision, step: Step | None) -> None:
        """Record a policy decision with this change: the facts, the version and rule, and why."""
        active = self.snapshot.policy
        facts = decision.facts
        row = {  # PolicyDecision's columns but its run's and step's (Changes.decision_rows)
            "action": facts.action,
            "workflow": facts.workflow,
            "tenant": facts.tenant,
            "facts": facts.to_json(),
            "version_id": active.version_id if active is not None else None,
            "rule": decision.rule,
            "outcome": decision.recorded_outcome,
            "tier": decision.tier,
            "reason": decision.reason[:2000],
            "created_at": self.now,
        }
        self.changes.decisions.append((row, step))
        if decision.outcome != "allow":
            self.record(
                Verb.POLICY_DECIDED,
                "step",
                step,
                step=step,
                outcome=decision.outcome,
                rule=decision.rule,
                version=decision.version,
                tier=decision.tier,
                reason=decision.reason,
            )

    def _add_step(self, step: Step) -> None:
        if (
            step.status == StepStatus.QUEUED
            and self.worker_id
            and self.changes.local_step is None
            and step.kind in (StepKind.AGENT, StepKind.ITEM)
            and step.pool in self.local_pools
        ):
            # Eager local execution: this worker serves the pool, so it takes the step now,
            # inside this transaction, and runs it after commit with no broker round trip.
            step.status = StepStatus.RUNNING
            step.attempt = 1
            step.lease_owner = self.worker_id
            step.lease_expires_at = self.now + timedelta(seconds=self.lease_seconds)
            step.started_at = self.now
            self.changes.local_step = step
        elif step.status == StepStatus.QUEUED:
            step.published_at = self.now
            self.queue(step)
        self._entered(step.status)
        self.changes.new_steps.append(step)

    def announce_steps(self) -> None:
        """Record the creation of the steps created so far (in order)."""
        for step in self.changes.new_steps[self._announced :]:
            if step is self.changes.local_step:
                # Created already claimed by this worker: one row records both (who, attempt).
                self.record(
                    Verb.STEP_CREATED,
                    "step",
                    step,
                    step=step,
                    key=step.key,
                    status=step.status,
                    worker=self.worker_id,
                    attempt=1,
                )
            else:
                self.record(
                    Verb.STEP_CREATED, "step", step, step=step, key=step.key, status=step.status
                )
            self.step_event(step, "created")
        self._announced = len(self.changes.new_steps)

    def _visit(self, name: str) -> int:
        visits = self.run.node_visits
        visit = int(visits.get(name, 0)) + 1
        visits[name] = visit
        return visit

    def steps_now(self, *statuses: str) -> list[Step]:
        """The run's steps in these statuses as they stand in this advance: the loaded ones
        (moved in place), the ones created here, in id order (new ones last)."""
        self.snapshot.require(ACTIVE_STEPS)
        if not set(statuses) <= set(STEP_ACTIVE):
            self.snapshot.require(DONE_STEPS)
        loaded = sorted(self.snapshot.steps.values(), key=lambda s: s.pk)
        return [s for s in (*loaded, *self.changes.new_steps) if s.status in statuses]

    # --- activating nodes -----------------------------------------------------------------------

    def announce_waits(self) -> None:
        for wait in self.changes.new_waits[self._waits_announced :]:
            self.record(
                Verb.WAIT_OPENED,
                "wait",
                wait,
                step=wait.step,
                kind=wait.kind,
                name=wait.name,
                payload=wait.action,
                deadline=wait.deadline_at.isoformat(),
            )
        self._waits_announced = len(self.changes.new_waits)

    def update_wait(self, wait: Wait, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(wait, name, value)
        if wait.pk is not None:
            self.changes.wait_updates.append((wait, fields))

    # --- outcomes -------------------------------------------------------------------------------

    def step_succeeded(
        self, step: Step, node: Node, output: Mapping[str, Any], written: Mapping[str, Any]
    ) -> None:
        """What a success leads to: the graph's part (``orchestration.advance.flow``)."""
        raise NotImplementedError

    def _finish_compensation(self, note: str = "") -> None:
        """How a run ends after undoing its side effects (``orchestration.advance.ending``)."""
        raise NotImplementedError

    def finish(self) -> Changes:
        """Settle the run's status and complete the changes (records, live events)."""
        self._settle_run_status()
        self.run.updated_at = self.now
        self.announce_steps()
        self.announce_waits()
        if self.run.status != self._status_before:
            self.changes.live.append(
                {"kind": "run", "change": self.run.status, "status": self.run.status}
            )
            self._status_before = self.run.status
        return self.changes

    def _settle_run_status(self) -> None:
        run = self.run
        if run.is_terminal:
            return
        if run.status == RunStatus.COMPENSATING:
            if run.active_steps == 0:
                self._finish_compensation()
            return
        if run.active_steps == 0:
            run.status = RunStatus.SUCCEEDED
            run.output = {**run.state, "_degraded": run.degraded} if run.degraded else run.state
            run.finished_at = self.now
            self.record(Verb.RUN_SUCCEEDED, "run", run)
            return
        previous = run.status
        if run.active_steps == run.waiting_steps:
            run.status = RunStatus.WAITING
        elif previous == RunStatus.QUEUED and run.started_at is None:
            return
        else:
            run.status = RunStatus.RUNNING
        if run.status != previous:
            verb = {RunStatus.WAITING: Verb.RUN_WAITING, RunStatus.RUNNING: Verb.RUN_RESUMED}[
                run.status
            ]
            if previous == RunStatus.QUEUED:
                verb = Verb.RUN_STARTED if run.status == RunStatus.RUNNING else verb
                run.started_at = run.started_at or self.now
            self.record(verb, "run", run)
