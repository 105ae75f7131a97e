"""The deterministic core: what happens to a run when a step finishes, fails or is decided.

Everything here runs inside a transaction that holds the run row's lock (``run_lock``). A
:class:`Tx` collects the effects of one transaction — new steps, state versions, audit entries,
live events, wake-up messages — and :meth:`Tx.flush` writes them in a handful of bulk statements
and schedules the messages for after commit. No LLM, no clock other than ``tx.now``, no I/O
besides the database: the same inputs give the same steps.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any, cast

from django.conf import settings
from django.db import transaction
from pydantic import BaseModel, ValidationError

from audit.services import Entry, audit_record_many
from audit.verbs import ActorType, Verb
from infra.sql import Batch, insert, pipeline, update
from orchestration import live, store
from orchestration.agents.base import StateView
from orchestration.definition import END, FAIL, Failure, Node, Workflow
from orchestration.errors import (
    Code,
    ContractViolation,
    ErrorClass,
    LimitExceeded,
    SignalboxError,
    StateAccessDenied,
)
from orchestration.handoff import held_messages
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

RUN_FLUSH_FIELDS = (
    "version", "status", "state", "state_versions", "node_visits", "pending_joins", "active_steps",
    "waiting_steps", "step_count", "notes", "degraded", "output", "error_code", "error_message",
    "started_at", "finished_at", "updated_at",
)

#: A node may run at most this many times in one run unless its route declares a loop_limit.
DEFAULT_MAX_VISITS = 10

#: The error code of a cancelled run (it ends ``cancelled``, after any compensations).
CANCELLED = "cancelled"
#: Compensation steps are named after the node they undo: ``undo:execute_refund``.
UNDO = "undo:"
#: At most this many tool calls are copied into an escalation's context (the rest are linked).
ESCALATION_TOOL_CALLS = 50


def node_of(wf: Workflow, step: Step) -> Node:
    """The workflow node a step activates (a compensation step: the node it undoes)."""
    if step.kind == StepKind.COMPENSATE:
        return wf.node(step.node.removeprefix(UNDO))
    return wf.node(step.node)


def output_contract(step: Step, node: Node) -> type[BaseModel]:
    """What a step's output must satisfy: the node's agent's contract (a fallback agent, an
    operator's skip value and a degraded result are held to it too); a compensation's own."""
    if step.kind == StepKind.COMPENSATE:
        return agent_class(step.agent).Output
    return agent_class(node.agent).Output


def agents_tried(step: Step) -> list[str]:
    """The agents that ran this step so far, in order (the primary, then a fallback)."""
    tried = [entry.get("agent", "") for entry in step.attempts_log if entry.get("agent")]
    return list(dict.fromkeys([*tried, step.agent]))


def queue_name(pool: str) -> str:
    return f"pool.{pool}"


def digest(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def new_trace_id() -> str:
    return secrets.token_hex(16)


class NeedsTransaction(Exception):
    """A deferred (batched) Tx reached a path that writes before its end; redo it in a
    transaction."""


class Tx:
    """The effects of one engine transaction on one (locked) run."""

    def __init__(
        self,
        run: Run,
        now: datetime,
        *,
        actor_type: str = ActorType.SYSTEM,
        actor_id: str = "",
        worker_id: str = "",
        local_pools: frozenset[str] = frozenset(),
        optimistic: bool = False,
        batch: Batch | None = None,
        new_run: bool = False,
    ):
        self.run = run
        #: The run row does not exist yet (a batched submit): flush inserts it.
        self.new_run = new_run
        #: Deferred: every write goes into ``batch`` (one round trip, committed by the caller)
        #: and after-commit work into ``after_commit``; a path that must write earlier raises
        #: NeedsTransaction so the caller redoes it in a real transaction.
        self.batch = batch
        self.after_commit: list[Callable[[], None]] = []
        #: Optimistic: the run row was read without a lock; flush writes it only if its version
        #: is unchanged (else the transaction aborts and the caller retries with fresh data).
        self.optimistic = optimistic
        self.expected_version = run.version
        self._flushing = False
        #: ToolCall rows of the completing attempt, written with its outcome.
        self.tool_calls: list[Any] = []
        #: Ready steps this transaction handed to the broker.
        self.handed_off: list[Step] = []
        #: The worker will try to claim the steps it hands off in its own pools when its local
        #: chain stops: their wake-up messages are held back for a moment (orchestration.handoff).
        self.hold_handoffs = False
        #: (step id, token, owner, values): the completing step's fenced update, written by flush.
        self.fence: tuple[int, int, str, dict[str, Any]] | None = None
        #: The completing step was never claimed in the database (a pure step run right after a
        #: sibling, committed in the sibling's transaction): the fence claims it as well, from
        #: ``queued`` at attempt ``token - 1``, and fails if another worker took it meanwhile.
        self.fence_claims = False
        self.wf: Workflow = workflow_get(run.workflow_name, run.workflow_version)
        self.now = now
        self.actor_type = actor_type
        self.actor_id = actor_id
        self.worker_id = worker_id
        self.local_pools = local_pools
        self.audit: list[Entry] = []
        self.new_steps: list[Step] = []
        self.new_waits: list[Wait] = []
        self.state_rows: list[StateVersion] = []
        self.live_events: list[dict[str, Any]] = []
        self.publish: list[tuple[Step, float]] = []
        #: A step this worker claimed inside this transaction and runs right after commit.
        self.local_step: Step | None = None
        self.flushed_events: list[dict[str, Any]] = []
        self._status_before = run.status

    # --- recording ------------------------------------------------------------------------------

    def record(self, verb: Verb, obj: str, obj_id: Any, *, step: Step | None = None, **kw: Any) -> None:
        self.audit.append(
            Entry(
                verb=verb,
                object_type=obj,
                object_id=obj_id,
                actor_type=kw.pop("actor_type", self.actor_type),
                actor_id=kw.pop("actor_id", self.actor_id),
                run_id=self.run.pk,
                step_id=step.pk if step is not None else None,
                trace_id=self.run.trace_id,
                payload=kw.pop("payload", None),
                data=kw,
            )
        )

    def step_event(self, step: Step, change: str) -> None:
        self.live_events.append(
            {
                "run_id": self.run.pk,
                "kind": "step",
                "change": change,
                "step_id": step.pk,
                "key": step.key,
                "status": step.status,
            }
        )

    # --- state ----------------------------------------------------------------------------------

    def state_view(self, node: Node) -> StateView:
        return StateView(self.run.state, reads=node.reads, writes=node.writes)

    def write_state(self, key: str, value: Any, *, writer: str, step: Step | None) -> None:
        versions = self.run.state_versions
        version = int(versions.get(key, 0)) + 1
        versions[key] = version
        self.run.state[key] = value
        self.state_rows.append(
            store.unsaved(
                StateVersion, run=self.run, key=key, version=version, value=value, step=step, writer=writer,
                created_at=self.now,
            )
        )
        self.record(Verb.STATE_WRITTEN, "state", f"{key}@{version}", step=step, payload=value, key=key, version=version)

    # --- counters -------------------------------------------------------------------------------

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
        """Change an existing step's status (and fields) and keep the run's counters true."""
        self._needs_transaction()
        self._left(step.status)
        self._entered(status)
        step.status = status
        for name, value in fields.items():
            setattr(step, name, value)
        Step.objects.filter(pk=step.pk).update(status=status, **fields)
        self.step_event(step, status)

    # --- creating steps -------------------------------------------------------------------------

    def _new_step(self, node: Node, *, kind: str, status: str, visit: int, item: int = -1, **fields: Any) -> Step:
        if self.run.step_count + 1 > self.wf.max_steps:
            raise LimitExceeded(
                f"run stopped by its max_steps bound ({self.wf.max_steps})",
                code=Code.MAX_STEPS,
                detail={"bound": "max_steps", "limit": self.wf.max_steps},
            )
        self.run.step_count += 1
        pool = ""
        if kind in (StepKind.AGENT, StepKind.ITEM):
            pool = node.pool or agent_class(node.agent).pool
        step = store.unsaved(
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
        if status == StepStatus.QUEUED and self.worker_id and self.local_step is None and pool in self.local_pools:
            # Eager local execution: this worker serves the pool, so it takes the step now,
            # inside this transaction, and runs it after commit with no broker round trip.
            step.status = StepStatus.RUNNING
            step.attempt = 1
            step.lease_owner = self.worker_id
            step.lease_expires_at = self.now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
            step.started_at = self.now
            self.local_step = step
        elif status == StepStatus.QUEUED:
            step.published_at = self.now
            self.publish.append((step, 0.0))
        self._entered(step.status)
        self.new_steps.append(step)
        return step

    def _default_attempts(self, node: Node) -> int:
        if node.agent:
            return agent_class(node.agent).max_attempts or self.wf.default_max_attempts
        return 1

    def _visit(self, name: str) -> int:
        visits = self.run.node_visits
        visit = int(visits.get(name, 0)) + 1
        visits[name] = visit
        return visit

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
        pending = self.run.pending_joins.setdefault(name, {"arrived": []})
        if pred.name not in pending["arrived"]:
            pending["arrived"].append(pred.name)
        if len(pending["arrived"]) < node.join_needed():
            return
        arrived = pending["arrived"]
        del self.run.pending_joins[name]
        if node.join != "all":
            # any / first N: the branches that lost the race are cancelled, so a late arrival
            # cannot release the join a second time.
            losers = [p for p in node.after if p not in arrived]
            for step in Step.objects.filter(run=self.run, node__in=losers, status__in=STEP_ACTIVE):
                self.cancel_step(step, reason=f"join {name!r} released by {', '.join(arrived)}")
        self.activate(name)

    def take_route(self, router: Node, target: str, step: Step | None) -> None:
        """Follow a route (or routing agent) to ``target``, honouring loop bounds."""
        if target not in (END, FAIL) and self.run.node_visits.get(target, 0) >= 1:
            limit = router.loop_limit or DEFAULT_MAX_VISITS
            if self.run.node_visits[target] >= limit:
                note = (
                    f"{router.name}: loop bound reached ({target!r} ran {limit} times); "
                    f"took {router.on_loop_limit!r}"
                )
                self.run.notes = [*self.run.notes, note]
                self.record(
                    Verb.RUN_LIMIT_HIT, "run", self.run.pk, step=step,
                    bound="loop_limit", node=router.name, target=target, limit=limit, taken=router.on_loop_limit,
                )
                if router.on_loop_limit == FAIL:
                    raise LimitExceeded(
                        f"run stopped by the loop bound of {router.name!r}: {target!r} may run {limit} times",
                        code=Code.LOOP_LIMIT,
                        detail={"bound": "loop_limit", "node": router.name, "target": target, "limit": limit},
                    )
                target = router.on_loop_limit
        if target == END:
            return
        if target == FAIL:
            raise SignalboxError(f"route {router.name!r} chose to fail the run", code=Code.ROUTE_FAILED)
        self.activate(target)

    def activate(self, name: str) -> None:
        node = self.wf.node(name)
        visit = self._visit(name)
        if node.kind == "route":
            self._run_route(node, visit)
        elif node.kind == "agent":
            self._activate_agent(node, visit)
        elif node.kind == "map":
            self._activate_map(node, visit)
        elif node.kind == "wait":
            self._activate_wait(node, visit)

    def _run_route(self, node: Node, visit: int) -> None:
        assert node.choose is not None
        try:
            target = node.choose(StateView(self.run.state, reads=node.reads, writes=frozenset()))
        except StateAccessDenied:
            raise
        except Exception as exc:  # a route is definition code: a bug in it fails the run clearly
            raise SignalboxError(f"route {node.name!r} raised {exc!r}", code=Code.ROUTE_ERROR) from exc
        if target not in node.targets and target not in (END, FAIL):
            raise SignalboxError(
                f"route {node.name!r} chose {target!r}, which is not one of its targets",
                code=Code.ROUTE_INVALID_TARGET,
                detail={"chosen": target, "targets": list(node.targets)},
            )
        step = self._new_step(
            node, kind=StepKind.ROUTE, status=StepStatus.SUCCEEDED, visit=visit,
            output={"chosen": target}, finished_at=self.now, started_at=self.now,
        )
        self.take_route(node, target, step)

    def _activate_agent(self, node: Node, visit: int) -> None:
        if node.approval is not None and node.approval.required(self.run.state):
            step = self._new_step(node, kind=StepKind.AGENT, status=StepStatus.WAITING, visit=visit)
            self.open_approval(step, node, self.action_for(step, node))
            return
        self._new_step(node, kind=StepKind.AGENT, status=StepStatus.QUEUED, visit=visit)

    def _activate_map(self, node: Node, visit: int) -> None:
        items = self.run.state.get(node.items)
        if not isinstance(items, list):
            raise SignalboxError(
                f"map {node.name!r} needs a list in state key {node.items!r}",
                code=Code.MAP_ITEMS_INVALID,
                detail={"key": node.items, "type": type(items).__name__},
            )
        if len(items) > node.max_items:
            raise LimitExceeded(
                f"map {node.name!r} got {len(items)} items; its bound is {node.max_items}",
                code=Code.FANOUT_LIMIT,
                detail={"bound": "max_items", "node": node.name, "limit": node.max_items, "got": len(items)},
            )
        parent = self._new_step(node, kind=StepKind.MAP, status=StepStatus.RUNNING, visit=visit, started_at=self.now)
        parent.output = {"total": len(items)}
        # Items reference the parent, so the parent row must exist first.
        self.flush_steps()
        if not items:
            self.finish_map(parent, [])
            return
        for index, item in enumerate(items):
            status = StepStatus.QUEUED if index < node.concurrency else StepStatus.PENDING
            self._new_step(
                node, kind=StepKind.ITEM, status=status, visit=visit, item=index, parent=parent,
                input=item if isinstance(item, dict) else {"item": item},
            )

    def _activate_wait(self, node: Node, visit: int) -> None:
        step = self._new_step(node, kind=StepKind.WAIT, status=StepStatus.WAITING, visit=visit, started_at=self.now)
        assert node.wait_timeout is not None
        wait = Wait(
            run=self.run, step=step, kind=WaitKind.EVENT, name=node.event, tier=0,
            reason=f"waiting for event {node.event!r}", deadline_at=self.now + node.wait_timeout,
            on_timeout=node.on_timeout, created_at=self.now,
        )
        self.new_waits.append(wait)
        # An event that arrived before the run reached this wait is applied now, once.
        early = (
            RunEvent.objects.filter(run=self.run, name=node.event, wait__isnull=True, applied_at__isnull=True)
            .order_by("id")
            .first()
        )
        if early is not None:
            self.flush_steps()
            self.new_waits.remove(wait)
            wait.save(force_insert=True)
            self.record(Verb.WAIT_OPENED, "wait", wait.pk, step=step, kind=wait.kind, name=wait.name)
            self.apply_event(wait, early)

    # --- approvals ------------------------------------------------------------------------------

    def action_for(self, step: Step, node: Node) -> dict[str, Any]:
        return step_action(step, node, self.run)

    def open_approval(self, step: Step, node: Node, action: dict[str, Any]) -> Wait:
        assert node.approval is not None
        wait = Wait(
            run=self.run, step=step, kind=WaitKind.APPROVAL, name=node.name, tier=node.approval.tier,
            reason=node.approval.reason, action=action, action_digest=digest(action),
            deadline_at=self.now + node.approval.timeout, on_timeout=node.approval.on_timeout,
            created_at=self.now,
        )
        self.new_waits.append(wait)
        return wait

    # --- outcomes -------------------------------------------------------------------------------

    def step_succeeded(self, step: Step, node: Node, output: Mapping[str, Any], written: Mapping[str, Any]) -> None:
        """Write the step's declared outputs to state and activate what comes next."""
        if step.kind == StepKind.COMPENSATE:
            self.record(Verb.STEP_SUCCEEDED, "step", step.pk, step=step, payload=output, key=step.key, attempt=step.attempt)
            self._compensated(step)
            return
        writer = step.agent or step.node
        if step.kind != StepKind.ITEM:
            for key in sorted(node.writes):
                if key in written:
                    self.write_state(key, written[key], writer=writer, step=step)
                elif key in output:
                    self.write_state(key, output[key], writer=writer, step=step)
        self.record(Verb.STEP_SUCCEEDED, "step", step.pk, step=step, payload=output, key=step.key, attempt=step.attempt)
        if step.kind == StepKind.ITEM:
            self._item_done(step, node)
            return
        self.successors(step, node, output)

    def successors(self, step: Step, node: Node, output: Mapping[str, Any]) -> None:
        if node.routes:
            choice = output.get(node.route_field)
            target = node.routes.get(str(choice)) if choice is not None else None
            if target is None:
                raise SignalboxError(
                    f"routing agent {node.name!r} chose {choice!r}; expected one of {sorted(node.routes)}",
                    code=Code.ROUTE_INVALID_CHOICE,
                    detail={"chosen": choice, "routes": sorted(node.routes)},
                )
            self.record(Verb.STEP_ROUTED, "step", step.pk, step=step, chosen=choice, target=target)
            self.take_route(node, target, step)
            return
        for name in self.wf.successors(node.name):
            self.arrive(node, name)

    def _item_done(self, item: Step, node: Node) -> None:
        # The run row (locked, or version-checked at flush) serialises writers of this map.
        # An item step always has its map step as parent.
        parent = Step.objects.get(pk=cast(int, item.parent_id))
        next_item = (
            Step.objects.filter(parent=parent, status=StepStatus.PENDING).order_by("item").first()
        )
        if next_item is not None:
            self.move(next_item, StepStatus.QUEUED, published_at=self.now)
            self.publish.append((next_item, 0.0))
            self.record(Verb.STEP_RELEASED, "step", next_item.pk, step=next_item, key=next_item.key)
            return
        if self.run.active_steps > 1 and Step.objects.filter(
            parent=parent, status__in=(StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING)
        ).exclude(pk=item.pk).exists():
            return
        # This item's own row may not say "succeeded" yet (its fenced update is written at
        # flush), so its output comes from memory; the others' from their rows, in item order.
        by_item = dict(
            Step.objects.filter(parent=parent, status=StepStatus.SUCCEEDED)
            .exclude(pk=item.pk)
            .values_list("item", "output")
        )
        by_item[item.item] = item.output
        self.finish_map(parent, [by_item[index] for index in sorted(by_item)])

    def finish_map(self, parent: Step, outputs: list[Any]) -> None:
        node = self.wf.node(parent.node)
        self.move(parent, StepStatus.SUCCEEDED, output={"total": len(outputs), "items": outputs}, finished_at=self.now)
        (key,) = node.writes
        self.write_state(key, outputs, writer=f"map:{node.name}", step=parent)
        self.record(Verb.STEP_SUCCEEDED, "step", parent.pk, step=parent, key=parent.key, items=len(outputs))
        self.successors(parent, node, {})

    def apply_event(self, wait: Wait, event: RunEvent) -> None:
        """Deliver ``event`` to ``wait`` (both locked by the caller's run lock): exactly once."""
        step = wait.step
        node = self.wf.node(step.node)
        wait.status = WaitStatus.RECEIVED
        wait.payload = event.payload
        wait.decided_at = self.now
        Wait.objects.filter(pk=wait.pk).update(status=wait.status, payload=wait.payload, decided_at=self.now)
        event.wait = wait
        event.applied_at = self.now
        RunEvent.objects.filter(pk=event.pk).update(wait=wait, applied_at=self.now)
        self.move(step, StepStatus.SUCCEEDED, output=event.payload, finished_at=self.now)
        self.record(Verb.EVENT_APPLIED, "wait", wait.pk, step=step, payload=event.payload, event=event.name, event_id=event.event_id)
        written = {key: event.payload for key in node.writes}
        self.step_succeeded(step, node, event.payload, written)

    def cancel_step(self, step: Step, *, reason: str) -> None:
        self.move(step, StepStatus.CANCELLED, finished_at=self.now, lease_owner="", error_message=reason)
        self.record(Verb.STEP_CANCELLED, "step", step.pk, step=step, reason=reason)
        for wait in Wait.objects.filter(step=step, status=WaitStatus.OPEN):
            Wait.objects.filter(pk=wait.pk).update(status=WaitStatus.CANCELLED, decided_at=self.now)
            self.record(Verb.WAIT_CANCELLED, "wait", wait.pk, step=step)

    def fail_run(self, code: str, message: str, *, step: Step | None = None, verb: Verb = Verb.RUN_FAILED) -> None:
        """Stop the run: cancel what is still active and record why. Completed steps that
        declared a compensation are undone first, newest first; the run ends after them."""
        if self.run.is_terminal:
            return
        if self.run.status == RunStatus.COMPENSATING:
            self.stop_compensating(code, message, step=step)
            return
        self.flush_steps()
        for other in Step.objects.filter(run=self.run, status__in=STEP_ACTIVE).order_by("id"):
            if step is not None and other.pk == step.pk:
                continue
            self.cancel_step(other, reason=f"run ended: {code}")
        self.run.pending_joins = {}
        self.run.error_code = code
        self.run.error_message = message
        self.record(verb, "run", self.run.pk, step=step, code=code, message=message)
        if not self._start_compensation(step, message):
            self._end(RunStatus.CANCELLED if code == CANCELLED else RunStatus.FAILED)

    def _end(self, status: str) -> None:
        self.run.status = status
        self.run.finished_at = self.now

    # --- compensation (saga) --------------------------------------------------------------------

    def _start_compensation(self, trigger: Step | None, reason: str) -> bool:
        """Create one compensation step per completed step whose node declares ``compensate``,
        newest first; the first is queued, the rest wait their turn. False if there are none."""
        done = list(
            Step.objects.filter(
                run=self.run, status=StepStatus.SUCCEEDED, kind__in=(StepKind.AGENT, StepKind.ITEM)
            ).order_by("-finished_at", "-id")
        )
        if trigger is not None and trigger.status == StepStatus.SUCCEEDED and trigger.kind in (StepKind.AGENT, StepKind.ITEM):
            # Its own row is written at flush: it is the newest completed step.
            done = [trigger, *(s for s in done if s.pk != trigger.pk)]
        # A step an operator skipped never ran its action: nothing to undo.
        undo = [s for s in done if node_of(self.wf, s).compensate and not s.degraded.startswith("skipped by")]
        if not undo:
            return False
        for index, original in enumerate(undo):
            node = node_of(self.wf, original)
            comp = agent_class(node.compensate)
            status = StepStatus.QUEUED if index == 0 else StepStatus.PENDING
            step = Step(
                run=self.run, node=UNDO + original.node, visit=original.visit, item=original.item,
                kind=StepKind.COMPENSATE, agent=node.compensate, pool=node.pool or comp.pool, parent=original,
                status=status, max_attempts=comp.max_attempts or self.wf.default_max_attempts,
                input={"step": original.key, "input": original.input, "output": original.output, "reason": reason},
                available_at=self.now, created_at=self.now,
            )
            if status == StepStatus.QUEUED:
                step.published_at = self.now
                self.publish.append((step, 0.0))
            self._entered(status)
            # Counted, but never refused by max_steps: undoing is bounded by what was done.
            self.run.step_count += 1
            self.new_steps.append(step)
        self.run.status = RunStatus.COMPENSATING
        self.record(
            Verb.RUN_COMPENSATING, "run", self.run.pk, step=trigger, steps=[s.key for s in undo],
            outcome=RunStatus.CANCELLED if self.run.error_code == CANCELLED else RunStatus.FAILED,
        )
        self.run.notes = [*self.run.notes, f"compensating {len(undo)} completed step(s): {', '.join(s.key for s in undo)}"]
        return True

    def _compensated(self, step: Step) -> None:
        """A compensation finished: release the next one, or end the run after the last."""
        self.record(Verb.STEP_COMPENSATED, "step", step.parent_id, step=step, undone=step.key.removeprefix(UNDO))
        following = (
            Step.objects.filter(run=self.run, kind=StepKind.COMPENSATE, status=StepStatus.PENDING).order_by("id").first()
        )
        if following is not None:
            self.move(following, StepStatus.QUEUED, available_at=self.now, published_at=self.now)
            self.publish.append((following, 0.0))
            return
        if self.run.active_steps == 0:
            self._finish_compensation()

    def _finish_compensation(self, note: str = "") -> None:
        final = RunStatus.CANCELLED if self.run.error_code == CANCELLED else RunStatus.FAILED
        self._end(final)
        if note:
            self.run.notes = [*self.run.notes, note]
        self.record(Verb.RUN_COMPENSATED, "run", self.run.pk, outcome=final, note=note)

    def stop_compensating(self, code: str, message: str, *, step: Step | None = None) -> None:
        """An operator aborted (or a bound ended) the compensations: the rest are cancelled."""
        self.flush_steps()
        for other in Step.objects.filter(run=self.run, status__in=STEP_ACTIVE).order_by("id"):
            if step is not None and other.pk == step.pk:
                continue
            self.cancel_step(other, reason=f"compensation stopped: {code}")
        self.run.error_message = f"{self.run.error_message}; compensation stopped: {message}"
        self._finish_compensation(note=f"compensation stopped ({code}): {message}")

    def fail_step(self, step: Step, error: SignalboxError, *, payload: Any = None) -> None:
        """A step failed for good: record the error (and the offending payload) and fail the run."""
        detail = error.detail
        if payload is not None:
            detail = {"detail": error.detail, "payload": _truncate(payload)}
        fields = {
            "error_class": error.error_class,
            "error_code": error.code,
            "error_message": error.message,
            "error_detail": detail,
            "finished_at": self.now,
            "lease_owner": "",
        }
        if step.pk is None:
            for name, value in fields.items():
                setattr(step, name, value)
            self._left(step.status)
            step.status = StepStatus.FAILED
            self._entered(step.status)
        else:
            self.move(step, StepStatus.FAILED, **fields)
        verb = Verb.STEP_CONTRACT_VIOLATION if error.error_class == ErrorClass.CONTRACT else Verb.STEP_FAILED
        self.record(verb, "step", step.pk, step=step, payload=payload, code=error.code, message=error.message, error_class=error.error_class)
        run_verb = Verb.RUN_LIMIT_HIT if error.error_class == ErrorClass.LIMIT else Verb.RUN_FAILED
        if run_verb == Verb.RUN_LIMIT_HIT:
            self.record(Verb.RUN_LIMIT_HIT, "run", self.run.pk, step=step, code=error.code, detail=error.detail)
        self.fail_run(error.code, f"{step.key}: {error.message}", step=step)

    # --- recovery tiers -------------------------------------------------------------------------

    def step_exhausted(self, step: Step, error: SignalboxError, *, payload: Any = None) -> None:
        """An attempt failed and is not retried: hand the step to the node's fallback agent,
        else continue with its declared degraded result, else escalate it to an operator or
        fail the run, as the node declares. Compensations always escalate."""
        node = node_of(self.wf, step)
        compensation = step.kind == StepKind.COMPENSATE
        tried = agents_tried(step)
        if not compensation and node.fallback and node.fallback not in tried:
            self.fall_back(step, node, error)
            return
        if not compensation and node.degraded is not None:
            failure = Failure(
                step_key=step.key, agent=step.agent, code=error.code, message=error.message,
                error_class=str(error.error_class), attempts=len(step.attempts_log), agents_tried=tuple(tried),
                input=step.input,
            )
            try:
                value = output_contract(step, node).model_validate(node.degraded.value(failure)).model_dump(mode="json")
            except (ValidationError, TypeError, ValueError) as exc:
                error = ContractViolation(
                    f"the degraded result declared for {node.name!r} does not satisfy its contract ({exc.__class__.__name__})",
                    code=Code.DEGRADED_CONTRACT,
                )
            else:
                self.degrade(step, node, value, node.degraded.reason, error)
                return
        if compensation or self.wf.on_failure_of(node) == "escalate":
            self.escalate(step, node, error, payload=payload)
            return
        self.fail_step(step, error, payload=payload)

    def fall_back(self, step: Step, node: Node, error: SignalboxError) -> None:
        """Tier 2: the node's fallback agent takes the step, with attempts of its own."""
        fallback = agent_class(node.fallback)
        previous = step.agent
        self.move(
            step, StepStatus.QUEUED, agent=node.fallback, pool=node.pool or fallback.pool, failures=0,
            max_attempts=fallback.max_attempts or self.wf.default_max_attempts, lease_owner="",
            lease_expires_at=None, available_at=self.now, published_at=self.now,
            error_class=error.error_class, error_code=error.code, error_message=error.message,
        )
        self.publish.append((step, 0.0))
        self.record(
            Verb.STEP_FALLBACK, "step", step.pk, step=step, from_agent=previous, to_agent=node.fallback,
            code=error.code, message=error.message,
        )

    def degrade(self, step: Step, node: Node, output: dict[str, Any], reason: str, error: SignalboxError) -> None:
        """Tier 3: the run continues with the node's declared degraded result."""
        text = f"{reason} (after {error.code})"
        self.move(
            step, StepStatus.SUCCEEDED, output=output, finished_at=self.now, lease_owner="",
            lease_expires_at=None, degraded=text[:500], error_class=error.error_class, error_code=error.code,
            error_message=error.message,
        )
        self.note_degraded(step, text)
        self.step_succeeded(step, node, output, {})

    def note_degraded(self, step: Step, reason: str) -> None:
        """Make a degraded result visible on the run (its notes and ``degraded`` list)."""
        self.run.degraded = [*self.run.degraded, {"step": step.key, "reason": reason}]
        self.run.notes = [*self.run.notes, f"{step.key}: degraded: {reason}"]
        self.record(Verb.STEP_DEGRADED, "step", step.pk, step=step, reason=reason)

    def escalate(self, step: Step, node: Node, error: SignalboxError, *, payload: Any = None) -> Wait:
        """Tier 4: the step waits for an operator, who sees every attempt, error, provider and
        agent tried, and may retry it, skip it with a value, or abort the run."""
        detail = error.detail if payload is None else {"detail": error.detail, "payload": _truncate(payload)}
        self.move(
            step, StepStatus.WAITING, lease_owner="", lease_expires_at=None, error_class=error.error_class,
            error_code=error.code, error_message=error.message, error_detail=detail, input=step.input,
        )
        context = self.escalation_context(step, node, error, payload)
        wait = Wait(
            run=self.run, step=step, kind=WaitKind.ESCALATION, name=step.key, tier=1,
            reason=f"{context['why']}: {error.message}"[:2000], action=context, action_digest=digest(context),
            deadline_at=self.now + self.wf.escalation_timeout_of(node), on_timeout=FAIL, created_at=self.now,
        )
        self.new_waits.append(wait)
        verb = Verb.STEP_CONTRACT_VIOLATION if error.error_class == ErrorClass.CONTRACT else Verb.STEP_FAILED
        self.record(verb, "step", step.pk, step=step, payload=payload, code=error.code, message=error.message, error_class=error.error_class)
        self.record(Verb.STEP_ESCALATED, "step", step.pk, step=step, code=error.code, why=context["why"])
        return wait

    def escalation_context(self, step: Step, node: Node, error: SignalboxError, payload: Any) -> dict[str, Any]:
        """Everything an operator needs to decide, frozen at escalation time."""
        calls = [c for c in self.tool_calls if getattr(c, "step_id", None) == step.pk]
        earlier = list(ToolCall.objects.filter(step_id=step.pk).order_by("id")[:ESCALATION_TOOL_CALLS])
        tool_calls = [
            {
                "capability": c.capability, "provider": c.provider, "attempt": c.attempt, "status": c.status,
                "error_code": c.error_code, "error_message": c.error_message[:300], "latency_ms": c.latency_ms,
                "idempotency_key": c.idempotency_key, "at": c.created_at.isoformat() if c.created_at else None,
            }
            for c in [*earlier, *calls][:ESCALATION_TOOL_CALLS]
        ]
        if error.code == "max_attempts":
            why = "retries exhausted"
        elif error.error_class == ErrorClass.CONTRACT:
            why = "contract violation"
        elif error.error_class == ErrorClass.LIMIT:
            why = f"limit reached ({error.code})"
        else:
            why = f"{error.error_class} error"
        contract = output_contract(step, node)
        return {
            "why": why,
            "step": step.key,
            "node": node.name,
            "kind": step.kind,
            "compensation": step.kind == StepKind.COMPENSATE,
            "agent": step.agent,
            "agents_tried": agents_tried(step),
            "fallback": node.fallback or None,
            "error": {"class": error.error_class, "code": error.code, "message": error.message, "detail": error.detail},
            "attempts": step.attempts_log,
            "tool_calls": tool_calls,
            "input": _truncate(step.input) if step.input is not None else None,
            "payload": _truncate(payload) if payload is not None else None,
            "actions": [Decision.RETRY, Decision.SKIP, Decision.ABORT],
            "skip_contract": contract.__name__,
            "skip_schema": contract.model_json_schema(),
        }

    # --- writing --------------------------------------------------------------------------------

    def _needs_transaction(self) -> None:
        if self.batch is not None and not self._flushing:
            raise NeedsTransaction

    def flush_steps(self) -> None:
        if not self.new_steps:
            return
        self._needs_transaction()
        created, self.new_steps = self.new_steps, []
        store.assign_ids(Step, created)
        insert(Step, created, batch=self.batch)
        for step in created:
            if step.status == StepStatus.RUNNING and step is self.local_step:
                # Created already claimed by this worker: one row records both (who, attempt).
                self.record(Verb.STEP_CREATED, "step", step.pk, step=step, key=step.key, status=step.status,
                            worker=self.worker_id, attempt=1)
            else:
                self.record(Verb.STEP_CREATED, "step", step.pk, step=step, key=step.key, status=step.status)
            self.step_event(step, "created")

    def flush(self) -> None:
        """Write everything collected, update the run, and schedule messages for after commit.

        On PostgreSQL the writes go out in one round trip (they need no results back)."""
        self._settle_run_status()
        self.run.updated_at = self.now
        waits = [w for w in self.new_waits if w.pk is None]
        store.assign_ids(Step, self.new_steps)
        store.assign_ids(Wait, waits)
        self.run.version = self.expected_version + 1
        batch = self.batch
        self._flushing = True
        with pipeline() if batch is None else nullcontext():
            # The run row first: it is the lock every writer of this run takes, in this order.
            if self.new_run:
                insert(Run, [self.run], batch=batch)
                self.new_run = False
            elif self.optimistic:
                store.update_run_checked(self.run, RUN_FLUSH_FIELDS, self.expected_version, batch=batch)
            else:
                update(self.run, RUN_FLUSH_FIELDS, batch=batch)
            self.expected_version = self.run.version
            if self.fence is not None:
                step_id, token, owner, values = self.fence
                if self.fence_claims:
                    assert batch is not None
                    store.claim_completed_checked(step_id, token - 1, values, self.now, batch=batch)
                else:
                    store.fence_step_checked(step_id, token, owner, values, batch=batch)
                self.fence = None
            self.flush_steps()
            if waits:
                insert(Wait, waits, batch=batch)
                for wait in waits:
                    self.record(
                        Verb.WAIT_OPENED, "wait", wait.pk, step=wait.step, kind=wait.kind, name=wait.name,
                        payload=wait.action, deadline=wait.deadline_at.isoformat(),
                    )
            self.new_waits = []
            if self.state_rows:
                insert(StateVersion, self.state_rows, returning=False, batch=batch)
                self.state_rows = []
            if self.tool_calls:
                insert(ToolCall, self.tool_calls, returning=False, batch=batch)
                self.tool_calls = []
            audit_record_many(self.audit, now=self.now, batch=batch)
            self.audit = []
        self._flushing = False
        if self.run.status != self._status_before:
            self.live_events.append(
                {"run_id": self.run.pk, "kind": "run", "change": self.run.status, "status": self.run.status}
            )
            self._status_before = self.run.status
        events, self.live_events = self.live_events, []
        #: The events the after-commit send will carry (a batch's caller may add to them).
        self.flushed_events = events
        publish = [(step.pk, step.pool, delay) for step, delay in self.publish]
        self.handed_off = [step for step, delay in self.publish if delay == 0]
        self.publish = []
        hold_for = settings.SIGNALBOX["HANDOFF_HOLD_SECONDS"] if self.hold_handoffs else 0.0
        held = [(s.pk, s.pool) for s in self.handed_off if s.pool in self.local_pools] if hold_for > 0 else []
        if held:
            publish = [entry for entry in publish if (entry[0], entry[1]) not in held]
        # After commit, workers are woken first: the live view can wait a few microseconds.
        if self.batch is not None:
            if publish:
                self.after_commit.append(lambda: publish_steps(publish))
            self.after_commit.append(lambda: live.send_now(events))
            if held:
                self.after_commit.append(lambda: held_messages.hold(held, hold_for))
            return
        if publish:
            transaction.on_commit(lambda: publish_steps(publish))
        live.send_on_commit(events)
        if held:
            transaction.on_commit(lambda: held_messages.hold(held, hold_for))

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
            self.record(Verb.RUN_SUCCEEDED, "run", run.pk)
            return
        previous = run.status
        if run.active_steps == run.waiting_steps:
            run.status = RunStatus.WAITING
        elif previous == RunStatus.QUEUED and run.started_at is None:
            return
        else:
            run.status = RunStatus.RUNNING
        if run.status != previous:
            verb = {RunStatus.WAITING: Verb.RUN_WAITING, RunStatus.RUNNING: Verb.RUN_RESUMED}[run.status]
            if previous == RunStatus.QUEUED:
                verb = Verb.RUN_STARTED if run.status == RunStatus.RUNNING else verb
                run.started_at = run.started_at or self.now
            self.record(verb, "run", run.pk)


#: Task ids of the wake-up messages this process sent last, by step id (bounded): a worker
#: that ends up claiming such a step itself takes the message back (executor.step_execute).
sent_messages: dict[int, str] = {}


def publish_steps(steps: list[tuple[int, str, float]]) -> None:
    """Send the wake-up message for each step to its pool's queue (after commit)."""
    from infra.broker import task_publisher
    from orchestration.tasks import step_execute

    task = step_execute._get_current_object()  # the task itself, not its lazy proxy
    publisher = task_publisher(task.app)
    fast = publisher.usable(task)
    for step_id, pool, delay in steps:
        if delay > 0:
            step_execute.apply_async(args=[step_id], queue=queue_name(pool), countdown=delay)
            continue
        if fast:
            task_id = publisher.publish(task, [step_id], queue_name(pool))
        else:
            task_id = step_execute.apply_async(args=[step_id], queue=queue_name(pool)).id
        if len(sent_messages) >= 1024:
            sent_messages.clear()  # withdrawing is only an economy: forget the old ones
        sent_messages[step_id] = task_id


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


def run_lock(run_id: int) -> Run:
    """Lock and return the run row; call inside ``transaction.atomic()``."""
    return Run.objects.select_for_update().get(pk=run_id)


def _truncate(payload: Any, limit: int = 8_000) -> Any:
    """Keep offending payloads recordable: big ones are cut, with a note of their size."""
    try:
        text = json.dumps(payload, default=str)
    except (TypeError, ValueError):
        text = repr(payload)
    if len(text) <= limit:
        return payload
    return {"truncated": True, "size": len(text), "head": text[:limit]}
