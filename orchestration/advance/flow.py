"""The graph's flow in an advance: activating nodes, joins, routes and loops, fan-out, waits
and approvals, and what a step's success leads to."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, cast

from audit.verbs import Verb
from infra.canonical import digest
from infra.sql import unsaved
from orchestration import graph
from orchestration.advance.actions import node_input, step_action
from orchestration.advance.ending import Ending
from orchestration.agents.base import StateView
from orchestration.changes import (
    ACTIVE_STEPS,
    OPEN_WAITS,
)
from orchestration.definition import END, FAIL, Node
from orchestration.errors import Code, PolicyDenied
from orchestration.models import (
    STEP_ACTIVE,
    RunEvent,
    Step,
    StepKind,
    StepStatus,
    Wait,
    WaitKind,
    WaitStatus,
)
from policies.evaluate import Decision

#: How long an approval waits when neither the node nor the policy says.
DEFAULT_APPROVAL_SLA = timedelta(hours=24)


class RunAdvance(Ending):
    """One advance of one run: the graph's flow, on top of the ways steps and runs end."""

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
        bounds = self.bounds
        cap = bounds.max_loop_iterations if bounds is not None else None
        bound = graph.loop_check(router, target, self.run.node_visits, cap=cap)
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
            self._activate_agent(node, visit)
        elif node.kind == "map":
            self._activate_map(node, visit)
        elif node.kind == "wait":
            self._activate_wait(node, visit)

    def _activate_map(self, node: Node, visit: int) -> None:
        bounds = self.bounds
        cap = bounds.max_fan_out if bounds is not None else None
        items = graph.map_items(node, self.run.state.get(node.items), cap=cap)
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
            tenant_id=self.run.tenant_id,
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

    def _activate_agent(self, node: Node, visit: int) -> None:
        """An agent step becomes ready: the policy decides its action first (allow, deny,
        require an approval, or defer), and the definition's own approval gate applies too."""
        decision = self.policy_decide(node, node_input(node, self.run))
        gate = node.approval is not None and node.approval.required(self.run.state)
        if decision is not None and decision.outcome == "deny":
            step = self.new_step(node, kind=StepKind.AGENT, status=StepStatus.QUEUED, visit=visit)
            self.note_decision(decision, step)
            self.fail_step(
                step,
                PolicyDenied(
                    f"policy {decision.rule}: {decision.reason}",
                    code=Code.POLICY_DENIED,
                    detail={"rule": decision.rule, "version": decision.version},
                ),
            )
            return
        if gate or (decision is not None and decision.outcome == "require_approval"):
            step = self.new_step(node, kind=StepKind.AGENT, status=StepStatus.WAITING, visit=visit)
            if decision is not None:
                self.note_decision(decision, step)
            self.open_approval(step, node, step_action(step, node, self.run), decision=decision)
            return
        if (
            decision is not None
            and decision.outcome == "defer"
            and decision.defer_until is not None
        ):
            # Not before its window opens: queued with no wake-up now; the reaper sends it then.
            step = self.new_step(
                node,
                kind=StepKind.AGENT,
                status=StepStatus.QUEUED,
                visit=visit,
                deferred_until=decision.defer_until,
            )
            self.note_decision(decision, step)
            return
        step = self.new_step(node, kind=StepKind.AGENT, status=StepStatus.QUEUED, visit=visit)
        if decision is not None:
            self.note_decision(decision, step)

    def open_approval(
        self, step: Step, node: Node, action: dict[str, Any], *, decision: Decision | None = None
    ) -> Wait:
        """An approval for ``step``'s exact action: as the policy's decision requires (tier,
        quorum, stages, deadline, expiry), at least what the node's own gate asks."""
        gate = node.approval
        tier, quorum, stages = (gate.tier, gate.quorum, []) if gate is not None else (1, 1, [])
        deadline = graph.approval_deadline(node, self.now) if gate is not None else None
        on_timeout = gate.on_timeout if gate is not None else "reject"
        reason = gate.reason if gate is not None else ""
        sla_due_at = None
        if decision is not None and decision.outcome == "require_approval":
            stages = list(decision.stages) if len(decision.stages) > 1 else []
            tier = max(tier, decision.stages[0] if stages else decision.tier)
            quorum = max(quorum, decision.quorum or 1)
            if decision.sla is not None:
                deadline = self.now + decision.sla
                # The policy's SLA is also when the item breaches and climbs a tier
                # (services.waits_escalate_breached); set here, so no query when it opens.
                sla_due_at = deadline
            # Expiry approves only when the policy and the node's own gate (if it has one) both say so.
            lenient = decision.on_expiry == "approve" and (
                gate is None or gate.on_timeout == "approve"
            )
            on_timeout = "approve" if lenient else "reject"
            reason = decision.reason
        wait = unsaved(
            Wait,
            run=self.run,
            tenant_id=self.run.tenant_id,
            step=step,
            kind=WaitKind.APPROVAL,
            name=node.name,
            tier=tier,
            quorum=quorum,
            stages=stages,
            reason=reason or "approval required",
            action=action,
            action_digest=digest(action),
            deadline_at=deadline or self.now + DEFAULT_APPROVAL_SLA,
            on_timeout=on_timeout,
            policy_version=decision.version if decision is not None else None,
            policy_rule=decision.rule if decision is not None else "",
            created_at=self.now,
            sla_due_at=sla_due_at,
        )
        self.changes.new_waits.append(wait)
        return wait

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
