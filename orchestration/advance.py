"""Advancing a run: given what was loaded (a :class:`~orchestration.changes.Snapshot`), compute
what one transaction changes (a :class:`~orchestration.changes.Changes`).

This is the deterministic core. It touches no database and sends nothing: the caller loads the
snapshot (``orchestration.store``), writes the changes in one call and sends their messages after
commit (``orchestration.dispatch``). The graph's decisions come from ``orchestration.graph``,
failure handling from ``orchestration.failures`` and compensation from
``orchestration.compensation``; this module applies them to one run: new steps, moves of
existing steps and their counters on the run row, state versions, waits, audit records, live
events and wake-ups.

The entry points are the functions at the bottom (``run_started``, ``step_completed``,
``attempt_failed``, ...); :class:`RunAdvance` is the working state they share.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import BaseModel

from audit.services import Entry
from audit.verbs import ActorType, Verb
from infra.canonical import digest
from infra.sql import unsaved
from orchestration import compensation, failures, graph
from orchestration.agents.base import StateView
from orchestration.changes import (
    ACTIVE_STEPS,
    DONE_STEPS,
    OPEN_WAITS,
    Changes,
    Fence,
    Record,
    Snapshot,
    Wakeup,
)
from orchestration.compensation import UNDO
from orchestration.definition import END, FAIL, Failure, Node, Workflow
from orchestration.errors import Code, ErrorClass, LimitExceeded, SignalboxError
from orchestration.models import (
    STEP_ACTIVE,
    Decision,
    Run,
    RunEvent,
    RunStatus,
    StateVersion,
    Step,
    StepKind,
    StepStatus,
    ToolCall,
    Wait,
    WaitKind,
    WaitStatus,
)
from orchestration.registry import agent_class, workflow_get


def node_of(wf: Workflow, step: Step) -> Node:
    """The workflow node a step activates (a compensation step: the node it undoes)."""
    if step.kind == StepKind.COMPENSATE:
        return wf.node(compensation.undone_node(step.node))
    return wf.node(step.node)


def output_contract(step: Step, node: Node) -> type[BaseModel]:
    """What a step's output must satisfy: the node's agent's contract (a fallback agent, an
    operator's skip value and a degraded result are held to it too); a compensation's own."""
    if step.kind == StepKind.COMPENSATE:
        return agent_class(step.agent).Output
    return agent_class(node.agent).Output


def step_input(step: Step, node: Node, run: Run) -> Any:
    """The agent input a step would get now: its item, an operator's edit, or declared state."""
    if step.kind in (StepKind.ITEM, StepKind.COMPENSATE):
        return step.input
    if step.input_override is not None:
        return step.input_override
    view = StateView(run.state, reads=node.reads, writes=frozenset())
    if node.input is not None:
        return dict(node.input(view))
    return {key: run.state[key] for key in sorted(node.reads) if key in run.state}


def step_action(step: Step, node: Node, run: Run) -> dict[str, Any]:
    """The exact action a step would execute: what an approval is bound to."""
    return {
        "agent": node.agent,
        "node": node.name,
        "input": step_input(step, node, run),
        "state_versions": {k: run.state_versions.get(k, 0) for k in sorted(node.reads)},
    }


class RunAdvance:
    """The working state of one advance of one run: the run row (changed in place), what was
    loaded, and the changes collected so far."""

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
        self._status_before = run.status
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

    def new_step(
        self, node: Node, *, kind: str, status: str, visit: int, item: int = -1, **fields: Any
    ) -> Step:
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
            max_attempts=node.max_attempts or self._default_attempts(node),
            available_at=self.now,
            created_at=self.now,
            **fields,
        )
        self._add_step(step)
        return step

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

    def start(self) -> None:
        for name in self.wf.start_nodes():
            self.activate(name)

    def arrive(self, pred: Node, name: str) -> None:
        """``pred`` finished and ``name`` is after it: activate it, or record the arrival at a join."""
        node = self.wf.node(name)
        if not node.is_join:
            self.activate(name)
            return
        pending = self.run.pending_joins.get(name, {"arrived": []})
        arrival = graph.join_arrive(node, pending["arrived"], pred.name)
        if not arrival.released:
            self.run.pending_joins[name] = {"arrived": list(arrival.arrived)}
            return
        self.run.pending_joins.pop(name, None)
        if arrival.losers:
            self.snapshot.require(ACTIVE_STEPS, OPEN_WAITS)
            for step in self.steps_now(*STEP_ACTIVE):
                if step.node in arrival.losers:
                    self.cancel_step(
                        step, reason=f"join {name!r} released by {', '.join(arrival.arrived)}"
                    )
        self.activate(name)

    def take_route(self, router: Node, target: str, step: Step | None) -> None:
        """Follow a route (or routing agent) to ``target``, honouring loop bounds."""
        bound = graph.loop_check(router, target, self.run.node_visits)
        if bound is not None:
            note = f"{router.name}: loop bound reached ({target!r} ran {bound.limit} times); took {bound.taken!r}"
            self.run.notes = [*self.run.notes, note]
            self.record(
                Verb.RUN_LIMIT_HIT,
                "run",
                self.run,
                step=step,
                bound="loop_limit",
                node=router.name,
                target=target,
                limit=bound.limit,
                taken=bound.taken,
            )
            if bound.taken == FAIL:
                raise graph.loop_bound_error(router, bound)
            target = bound.taken
        if target == END:
            return
        if target == FAIL:
            raise graph.route_failed(router)
        self.activate(target)

    def activate(self, name: str) -> None:
        node = self.wf.node(name)
        visit = self._visit(name)
        if node.kind == "route":
            target = graph.route_choose(
                node, StateView(self.run.state, reads=node.reads, writes=frozenset())
            )
            step = self.new_step(
                node,
                kind=StepKind.ROUTE,
                status=StepStatus.SUCCEEDED,
                visit=visit,
                output={"chosen": target},
                finished_at=self.now,
                started_at=self.now,
            )
            self.take_route(node, target, step)
        elif node.kind == "agent":
            if node.approval is not None and node.approval.required(self.run.state):
                step = self.new_step(
                    node, kind=StepKind.AGENT, status=StepStatus.WAITING, visit=visit
                )
                self.open_approval(step, node, step_action(step, node, self.run))
                return
            self.new_step(node, kind=StepKind.AGENT, status=StepStatus.QUEUED, visit=visit)
        elif node.kind == "map":
            self._activate_map(node, visit)
        elif node.kind == "wait":
            self._activate_wait(node, visit)

    def _activate_map(self, node: Node, visit: int) -> None:
        items = graph.map_items(node, self.run.state.get(node.items))
        parent = self.new_step(
            node, kind=StepKind.MAP, status=StepStatus.RUNNING, visit=visit, started_at=self.now
        )
        parent.output = {"total": len(items)}
        self.announce_steps()
        if not items:
            self.finish_map(parent, [])
            return
        for index, item in enumerate(items):
            status = StepStatus.QUEUED if graph.map_item_queued(node, index) else StepStatus.PENDING
            self.new_step(
                node,
                kind=StepKind.ITEM,
                status=status,
                visit=visit,
                item=index,
                parent=parent,
                input=graph.map_item_input(item),
            )

    def _activate_wait(self, node: Node, visit: int) -> None:
        step = self.new_step(
            node, kind=StepKind.WAIT, status=StepStatus.WAITING, visit=visit, started_at=self.now
        )
        wait = unsaved(
            Wait,
            run=self.run,
            step=step,
            kind=WaitKind.EVENT,
            name=node.event,
            tier=0,
            reason=f"waiting for event {node.event!r}",
            deadline_at=graph.wait_deadline(node, self.now),
            on_timeout=node.on_timeout,
            created_at=self.now,
        )
        self.changes.new_waits.append(wait)
        # An event that arrived before the run reached this wait is applied now, once.
        early = self.snapshot.unapplied_event(node.event)
        if early is not None:
            self.announce_steps()
            self.announce_waits()
            self.apply_event(wait, early)

    # --- approvals ------------------------------------------------------------------------------

    def open_approval(self, step: Step, node: Node, action: dict[str, Any]) -> Wait:
        assert node.approval is not None
        wait = unsaved(
            Wait,
            run=self.run,
            step=step,
            kind=WaitKind.APPROVAL,
            name=node.name,
            tier=node.approval.tier,
            reason=node.approval.reason,
            action=action,
            action_digest=digest(action),
            deadline_at=graph.approval_deadline(node, self.now),
            on_timeout=node.approval.on_timeout,
            created_at=self.now,
        )
        self.changes.new_waits.append(wait)
        return wait

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
        """Write the step's declared outputs to state and activate what comes next."""
        if step.kind == StepKind.COMPENSATE:
            self.record(
                Verb.STEP_SUCCEEDED,
                "step",
                step,
                step=step,
                payload=output,
                key=step.key,
                attempt=step.attempt,
            )
            self._compensated(step)
            return
        writer = step.agent or step.node
        if step.kind != StepKind.ITEM:
            for key in sorted(node.writes):
                if key in written:
                    self.write_state(key, written[key], writer=writer, step=step)
                elif key in output:
                    self.write_state(key, output[key], writer=writer, step=step)
        self.record(
            Verb.STEP_SUCCEEDED,
            "step",
            step,
            step=step,
            payload=output,
            key=step.key,
            attempt=step.attempt,
        )
        if step.kind == StepKind.ITEM:
            self._item_done(step)
            return
        self.successors(step, node, output)

    def successors(self, step: Step, node: Node, output: Mapping[str, Any]) -> None:
        if node.routes:
            choice, target = graph.routing_agent_target(node, output)
            self.record(Verb.STEP_ROUTED, "step", step, step=step, chosen=choice, target=target)
            self.take_route(node, target, step)
            return
        for name in self.wf.successors(node.name):
            self.arrive(node, name)

    def _item_done(self, item: Step) -> None:
        progress = self.snapshot.map_state()
        parent = progress.parent
        what = graph.map_after_item(progress)
        if what == "release":
            following = cast(Step, progress.next_pending)
            assert following is not None
            self.move(following, StepStatus.QUEUED, published_at=self.now)
            self.queue(following)
            self.record(Verb.STEP_RELEASED, "step", following, step=following, key=following.key)
            return
        if what == "wait":
            return
        assert progress.outputs is not None
        self.finish_map(parent, graph.map_outputs(progress.outputs, item.item, item.output))

    def finish_map(self, parent: Step, outputs: list[Any]) -> None:
        node = self.wf.node(parent.node)
        self.move(
            parent,
            StepStatus.SUCCEEDED,
            output={"total": len(outputs), "items": outputs},
            finished_at=self.now,
        )
        (key,) = node.writes
        self.write_state(key, outputs, writer=f"map:{node.name}", step=parent)
        self.record(
            Verb.STEP_SUCCEEDED, "step", parent, step=parent, key=parent.key, items=len(outputs)
        )
        self.successors(parent, node, {})

    def apply_event(self, wait: Wait, event: RunEvent) -> None:
        """Deliver ``event`` to ``wait``: exactly once (the run row serialises writers)."""
        step = wait.step
        node = self.wf.node(step.node)
        self.update_wait(
            wait, status=WaitStatus.RECEIVED, payload=event.payload, decided_at=self.now
        )
        event.wait = wait
        event.applied_at = self.now
        if event.pk is not None:
            self.changes.event_updates.append((event, {"wait": wait, "applied_at": self.now}))
        self.move(step, StepStatus.SUCCEEDED, output=event.payload, finished_at=self.now)
        self.record(
            Verb.EVENT_APPLIED,
            "wait",
            wait,
            step=step,
            payload=event.payload,
            event=event.name,
            event_id=event.event_id,
        )
        written = {key: event.payload for key in node.writes}
        self.step_succeeded(step, node, event.payload, written)

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
            max_attempts=fallback.max_attempts or self.wf.default_max_attempts,
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
            tool_calls=[_tool_call_summary(c) for c in (*earlier, *current)],
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
            step=step,
            kind=WaitKind.ESCALATION,
            name=step.key,
            tier=1,
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


def _tool_call_summary(call: ToolCall) -> dict[str, Any]:
    return {
        "capability": call.capability,
        "provider": call.provider,
        "attempt": call.attempt,
        "status": call.status,
        "error_code": call.error_code,
        "error_message": call.error_message[:300],
        "latency_ms": call.latency_ms,
        "idempotency_key": call.idempotency_key,
        "at": call.created_at.isoformat() if call.created_at else None,
    }


# --- the entry points ---------------------------------------------------------------------------


def run_started(
    snapshot: Snapshot,
    now: datetime,
    *,
    state: Mapping[str, Any],
    input: Any,
    idempotency_key: str,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """A new run (not yet written): its input as state version 1 and its first steps."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id, insert_run=True)
    adv.record(
        Verb.RUN_SUBMITTED,
        "run",
        adv.run,
        payload=input,
        workflow=adv.wf.key,
        idempotency_key=idempotency_key,
    )
    for key, value in state.items():
        adv.write_state(key, value, writer="submit", step=None)
    try:
        adv.start()
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message)
    return adv.finish()


def step_completed(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    output: dict[str, Any],
    written: Mapping[str, Any],
    worker_id: str,
    pools: frozenset[str],
    tool_calls: list[ToolCall],
    tool_entries: list[Entry],
    hold_handoffs: bool,
    lease_seconds: float,
    optimistic: bool,
    fence: Fence,
) -> Changes:
    """A step's attempt succeeded with ``output``: its outputs to state, what comes next. A
    fence that ``claims`` (the step ran before its claim) records the claim first."""
    run = snapshot.run
    step.run = run
    step.status, step.output, step.finished_at = StepStatus.SUCCEEDED, output, now
    adv = RunAdvance(
        snapshot,
        now,
        actor_type=ActorType.AGENT,
        actor_id=step.agent,
        worker_id=worker_id,
        local_pools=pools,
        hold_handoffs=hold_handoffs,
        lease_seconds=lease_seconds,
        optimistic=optimistic,
    )
    adv.changes.fence = fence
    if fence.claims:
        adv.record(
            Verb.STEP_CLAIMED,
            "step",
            step,
            step=step,
            actor_type=ActorType.SYSTEM,
            actor_id=worker_id,
            attempt=step.attempt,
            worker=worker_id,
        )
    adv.changes.tool_calls.extend(tool_calls)
    adv.changes.audit.extend(tool_entries)
    adv._left(StepStatus.RUNNING)
    adv.step_event(step, "succeeded")
    node = node_of(adv.wf, step)
    try:
        if run.is_terminal or (
            run.status == RunStatus.COMPENSATING and step.kind != StepKind.COMPENSATE
        ):
            # Cancelled or failed meanwhile: the fence fails (the step was cancelled).
            return adv.changes
        if step.degraded:
            adv.note_degraded(step, step.degraded)
        if now > run.deadline_at and run.status != RunStatus.COMPENSATING:
            raise graph.run_deadline_error(adv.wf)
        adv.step_succeeded(step, node, output, written)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def attempt_failed(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    attempt_input: Any,
    error: SignalboxError,
    worker_id: str,
    tool_calls: list[ToolCall],
    tool_entries: list[Entry],
    payload: Any,
    delay: float,
) -> Changes:
    """A claimed attempt failed: retry it with backoff, or hand it to the next recovery tier.
    ``step`` is the step as it is now (locked), claimed by ``worker_id``."""
    adv = RunAdvance(
        snapshot, now, actor_type=ActorType.AGENT, actor_id=step.agent, worker_id=worker_id
    )
    adv.changes.tool_calls.extend(tool_calls)
    adv.changes.audit.extend(tool_entries)
    failures_now = step.failures + 1
    attempts_log = [
        *step.attempts_log,
        failures.attempt_entry(
            attempt=step.attempt, agent=step.agent, error=error, now=now, worker=worker_id
        ),
    ]
    node = node_of(adv.wf, step)
    decision = failures.attempt_failed(
        error,
        failures=failures_now,
        max_attempts=step.max_attempts,
        attempts_log=attempts_log,
        now=now,
        retry_within=adv.wf.retry_within_of(node),
        delay=delay,
    )
    try:
        if isinstance(decision, failures.Retry):
            adv.move(
                step,
                StepStatus.QUEUED,
                failures=failures_now,
                attempts_log=attempts_log,
                lease_owner="",
                lease_expires_at=None,
                available_at=now + timedelta(seconds=decision.delay),
                published_at=now,
                error_class=error.error_class,
                error_code=error.code,
                error_message=error.message,
            )
            adv.queue(step, decision.delay)
            adv.record(
                Verb.STEP_RETRY_SCHEDULED,
                "step",
                step,
                step=step,
                code=error.code,
                delay_seconds=round(decision.delay, 3),
                failures=failures_now,
            )
        else:
            step.failures, step.attempts_log = failures_now, attempts_log
            adv.changes.update_step(step, failures=failures_now, attempts_log=attempts_log)
            if step.input is None:  # the input this attempt was given, for the escalation
                step.input = attempt_input
            adv.step_exhausted(step, decision.error, payload=payload)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def lease_expired(snapshot: Snapshot, now: datetime, *, step: Step) -> Changes:
    """The worker running ``step`` stopped renewing its lease: a failed attempt (so a step that
    kills its worker every time is bounded by ``max_attempts``); queued again, or given up."""
    adv = RunAdvance(snapshot, now)
    adv.record(
        Verb.STEP_LEASE_EXPIRED,
        "step",
        step,
        step=step,
        worker=step.lease_owner,
        attempt=step.attempt,
    )
    failures_now = step.failures + 1
    error = failures.lease_expired_error(step.lease_owner)
    attempts_log = [
        *step.attempts_log,
        failures.attempt_entry(attempt=step.attempt, agent=step.agent, error=error, now=now),
    ]
    try:
        if failures_now >= step.max_attempts:
            step.failures, step.attempts_log = failures_now, attempts_log
            adv.changes.update_step(step, failures=failures_now, attempts_log=attempts_log)
            adv.step_exhausted(
                step, failures.lease_exhausted_error(failures_now, step.max_attempts)
            )
        else:
            adv.move(
                step,
                StepStatus.QUEUED,
                lease_owner="",
                lease_expires_at=None,
                available_at=now,
                published_at=now,
                failures=failures_now,
                attempts_log=attempts_log,
            )
            adv.queue(step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def approval_reopened(
    snapshot: Snapshot, now: datetime, *, step: Step, action: dict[str, Any], worker_id: str
) -> Changes:
    """What would execute differs from what was approved (or nothing was): ask again."""
    adv = RunAdvance(snapshot, now, worker_id=worker_id)
    node = adv.wf.node(step.node)
    if step.approved_digest:
        adv.record(
            Verb.APPROVAL_STALE,
            "step",
            step,
            step=step,
            payload=action,
            approved_digest=step.approved_digest,
            now_digest=digest(action),
        )
    adv.move(step, StepStatus.WAITING, lease_owner="", lease_expires_at=None, approved_digest="")
    adv.open_approval(step, node, action)
    return adv.finish()


def approval_decided(
    snapshot: Snapshot,
    now: datetime,
    *,
    wait: Wait,
    step: Step,
    decision: str,
    reason: str,
    edited_input: dict[str, Any] | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator decided an approval (the wait is already closed by the caller)."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    try:
        if decision == Decision.REJECT:
            adv.record(Verb.APPROVAL_REJECTED, "wait", wait, step=step, reason=reason)
            adv.fail_step(
                step,
                SignalboxError(
                    f"approval rejected: {reason or 'no reason given'}", code=Code.APPROVAL_REJECTED
                ),
            )
            return adv.finish()
        node = adv.wf.node(step.node)
        verb = Verb.APPROVAL_APPROVED
        if decision == Decision.EDIT:
            assert edited_input is not None
            verb = Verb.APPROVAL_EDITED
            _apply_edit(adv, step, node, edited_input)
        approved = digest(step_action(step, node, adv.run))
        adv.record(
            verb,
            "wait",
            wait,
            step=step,
            payload=edited_input,
            reason=reason,
            approved_digest=approved,
        )
        adv.move(
            step, StepStatus.QUEUED, approved_digest=approved, available_at=now, published_at=now
        )
        adv.queue(step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message, step=step)
    return adv.finish()


def _apply_edit(adv: RunAdvance, step: Step, node: Node, edited: dict[str, Any]) -> None:
    """An operator's edit becomes what the run records and what every later step sees: each
    edited field that is a state key the node reads is written as a new state version by that
    operator. Only an input built by the node's own ``input`` function (which may not map back
    onto state keys) is kept on the step instead."""
    if node.input is None and set(edited) <= node.reads:
        writer = f"operator:{adv.actor_id or 'system'}"
        for key in sorted(edited):
            if adv.run.state.get(key) != edited[key] or key not in adv.run.state:
                adv.write_state(key, edited[key], writer=writer, step=step)
        if step.input_override is not None:
            adv.changes.update_step(step, input_override=None)
            step.input_override = None
        return
    step.input_override = edited
    adv.changes.update_step(step, input_override=edited)


def wait_expired(snapshot: Snapshot, now: datetime, *, wait: Wait) -> Changes:
    """A wait's deadline passed (the caller closed it as expired): apply its declared outcome."""
    adv = RunAdvance(snapshot, now)
    step = wait.step
    adv.record(Verb.WAIT_EXPIRED, "wait", wait, step=step, outcome=wait.on_timeout, kind=wait.kind)
    try:
        _apply_timeout(adv, wait, step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message)
    return adv.finish()


def _apply_timeout(adv: RunAdvance, wait: Wait, step: Step) -> None:
    node = node_of(adv.wf, step)
    if wait.kind == WaitKind.ESCALATION:
        # Nobody answered: the step fails for good (an unanswered compensation ends the run's
        # compensations, which the run's error then says).
        adv.fail_step(
            step,
            LimitExceeded(
                f"escalation {wait.pk} expired unanswered",
                code=Code.ESCALATION_EXPIRED,
                detail={"bound": "escalation_timeout", "escalation": wait.pk},
            ),
        )
        return
    if wait.kind == WaitKind.APPROVAL:
        if wait.on_timeout == "approve":
            approved = digest(step_action(step, node, adv.run))
            adv.move(
                step,
                StepStatus.QUEUED,
                approved_digest=approved,
                available_at=adv.now,
                published_at=adv.now,
            )
            adv.queue(step)
            return
        adv.fail_step(
            step,
            SignalboxError(
                f"approval {wait.pk} expired unanswered (fails closed)", code=Code.APPROVAL_EXPIRED
            ),
        )
        return
    outcome = graph.event_timeout(wait.on_timeout)
    if outcome.kind == "fail":
        adv.fail_step(
            step,
            SignalboxError(f"no {wait.name!r} event before the deadline", code=Code.WAIT_TIMEOUT),
        )
        return
    timed_out = graph.timed_out_payload(wait.name)
    adv.move(step, StepStatus.SUCCEEDED, output=timed_out, finished_at=adv.now)
    adv.record(Verb.STEP_SUCCEEDED, "step", step, step=step, payload=timed_out, timed_out=True)
    if outcome.kind == "continue":
        for key in node.writes:
            adv.write_state(key, timed_out, writer=f"timeout:{wait.name}", step=step)
        adv.successors(step, node, timed_out)
    elif outcome.kind == "goto":
        adv.activate(outcome.node)


def run_cancelled(
    snapshot: Snapshot, now: datetime, *, reason: str, actor_type: str, actor_id: str
) -> Changes:
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    adv.fail_run(
        Code.CANCELLED, reason or f"cancelled by {actor_id or 'system'}", verb=Verb.RUN_CANCELLED
    )
    return adv.finish()


def run_past_deadline(snapshot: Snapshot, now: datetime) -> Changes:
    adv = RunAdvance(snapshot, now)
    adv.record(
        Verb.RUN_LIMIT_HIT, "run", adv.run, bound="max_duration", limit=str(adv.wf.max_duration)
    )
    adv.fail_run(
        Code.RUN_DEADLINE, f"run stopped by its max_duration bound ({adv.wf.max_duration})"
    )
    return adv.finish()


def event_received(
    snapshot: Snapshot,
    now: datetime,
    *,
    event: RunEvent,
    wait: Wait | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An outside event reached the run (``event`` is new): apply it to ``wait`` if one is open
    for it, otherwise keep it until the run waits for it."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    adv.changes.new_events.append(event)
    adv.record(
        Verb.EVENT_RECEIVED,
        "event",
        event,
        payload=event.payload,
        name=event.name,
        event_id=event.event_id,
    )
    if wait is not None:
        try:
            adv.apply_event(wait, event)
        except SignalboxError as exc:
            adv.fail_run(exc.code, exc.message)
    return adv.finish()


def escalation_resolved(
    snapshot: Snapshot,
    now: datetime,
    *,
    wait: Wait,
    step: Step,
    action: str,
    reason: str,
    output: dict[str, Any] | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator answered an escalation (the wait is already closed by the caller)."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    node = node_of(adv.wf, step)
    who = actor_id or "the system"
    if action == Decision.RETRY:
        is_compensation = step.kind == StepKind.COMPENSATE
        agent = step.agent if is_compensation else node.agent
        # The same budget the step had at first: a compensation's is its agent's own.
        budget = (None if is_compensation else node.max_attempts) or agent_class(agent).max_attempts
        adv.record(Verb.ESCALATION_RETRIED, "wait", wait, step=step, reason=reason, agent=agent)
        adv.move(
            step,
            StepStatus.QUEUED,
            agent=agent,
            pool=node.pool or agent_class(agent).pool,
            failures=0,
            max_attempts=budget or adv.wf.default_max_attempts,
            available_at=now,
            published_at=now,
            error_class="",
            error_code="",
            error_message="",
            error_detail=None,
        )
        adv.queue(step)
    elif action == Decision.SKIP:
        assert output is not None
        note = f"{compensation.SKIPPED} {who} with a supplied value" + (
            f": {reason}" if reason else ""
        )
        adv.record(Verb.ESCALATION_SKIPPED, "wait", wait, step=step, payload=output, reason=reason)
        # The failure that led here stays in the escalation's context and the attempts log.
        adv.move(
            step,
            StepStatus.SUCCEEDED,
            output=output,
            finished_at=now,
            degraded=note[:500],
            error_class="",
            error_code="",
            error_message="",
            error_detail=None,
        )
        adv.note_degraded(step, note)
        try:
            adv.step_succeeded(step, node, output, {})
        except SignalboxError as exc:
            adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    else:
        adv.record(Verb.ESCALATION_ABORTED, "wait", wait, step=step, reason=reason)
        adv.fail_step(
            step,
            SignalboxError(
                f"aborted by {who} after escalation" + (f": {reason}" if reason else ""),
                code=Code.ABORTED,
            ),
        )
    return adv.finish()
