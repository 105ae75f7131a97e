"""Advancing a run is computed from what was loaded, without touching the database
(orchestration/advance.py). These tests have no database at all: pytest-django refuses any
query, so a computation that reads one fails here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest

from audit.verbs import Verb
from infra.sql import unsaved
from orchestration import advance
from orchestration.changes import (
    ACTIVE_STEPS,
    DONE_STEPS,
    NEEDS,
    OPEN_WAITS,
    Changes,
    Fence,
    Missing,
    Snapshot,
)
from orchestration.graph import MapProgress
from orchestration.models import (
    Run,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Wait,
    WaitKind,
    WaitStatus,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
_ids = count(1000)


def _run(workflow: str, **state: Any) -> Run:
    run = Run(
        pk=next(_ids),
        workflow_name=workflow,
        workflow_version=1,
        status=RunStatus.RUNNING,
        trace_id="t" * 32,
        input={},
        state=dict(state),
        state_versions=dict.fromkeys(state, 1),
        created_at=NOW,
        updated_at=NOW,
        started_at=NOW,
        deadline_at=NOW + timedelta(hours=1),
    )
    return run


def _step(
    run: Run,
    node: str,
    status: str,
    *,
    kind: str = StepKind.AGENT,
    agent: str = "test_echo",
    **fields: Any,
) -> Step:
    step = unsaved(
        Step,
        run=run,
        node=node,
        kind=kind,
        agent=agent,
        pool="default",
        status=status,
        available_at=NOW,
        created_at=NOW,
        **fields,
    )
    step.pk = next(_ids)
    return step


def _completed(snapshot: Snapshot, step: Step, output: dict[str, Any], **kw: Any) -> Changes:
    return advance.step_completed(
        snapshot,
        NOW,
        step=step,
        output=output,
        written={},
        worker_id=kw.pop("worker_id", ""),
        pools=kw.pop("pools", frozenset()),
        tool_calls=[],
        tool_entries=[],
        hold_handoffs=False,
        lease_seconds=30,
        optimistic=True,
        fence=Fence(step.pk, 1, "w", {"status": "succeeded"}),
    )


def _verbs(changes: Changes) -> list[str]:
    return [Verb(e.verb).label for e in changes.audit_entries()]


def test_a_new_run_starts_its_first_steps_and_records_its_input_as_state() -> None:
    run = Run(
        workflow_name="reference_workload",
        workflow_version=1,
        status=RunStatus.QUEUED,
        trace_id="t",
        input={"topic": "x"},
        created_at=NOW,
        updated_at=NOW,
        deadline_at=NOW + timedelta(hours=1),
    )
    changes = advance.run_started(
        Snapshot(run=run, loaded=NEEDS),
        NOW,
        state={"topic": "x"},
        input={"topic": "x"},
        idempotency_key="",
        actor_type="system",
        actor_id="",
    )
    assert [s.node for s in changes.new_steps] == ["classify"]
    assert [w.step.node for w in changes.wakeups] == ["classify"]
    assert [(v.key, v.version, v.writer) for v in changes.state_versions] == [
        ("topic", 1, "submit")
    ]
    assert _verbs(changes) == ["run.submitted", "state.written", "step.created"]
    assert changes.insert_run and run.active_steps == 1


def test_a_completion_whose_next_step_this_worker_serves_claims_it_in_the_same_change() -> None:
    run = _run("siblings", text="t")
    start = _step(run, "start", StepStatus.RUNNING, attempt=1)
    run.active_steps, run.node_visits = 1, {"start": 1}
    changes = _completed(
        Snapshot(run=run, focus=start),
        start,
        {"text": "echo:t"},
        worker_id="w1",
        pools=frozenset({"default"}),
    )
    created = {s.node: s for s in changes.new_steps}
    # One sibling runs here after commit (claimed in this change), the other is handed off.
    assert changes.local_step is created["a"] and created["a"].status == StepStatus.RUNNING
    assert created["a"].lease_owner == "w1" and created["a"].attempt == 1
    assert [w.step.node for w in changes.wakeups] == ["b"]
    assert run.active_steps == 2 and run.state["text"] == "echo:t"


def test_a_completion_that_needs_rows_not_loaded_asks_for_them_instead_of_reading() -> None:
    run = _run("first_wins", text="t")
    run.node_visits = {"start": 1, "fast": 1, "slow": 1}
    fast = _step(run, "fast", StepStatus.RUNNING, attempt=1)
    run.active_steps = 2
    with pytest.raises(Missing) as missing:
        _completed(Snapshot(run=run, focus=fast), fast, {"text": "x"})
    assert missing.value.needs == {ACTIVE_STEPS, OPEN_WAITS}


def test_an_any_join_cancels_the_branch_that_lost_the_race() -> None:
    run = _run("first_wins", text="t")
    run.node_visits = {"start": 1, "fast": 1, "slow": 1}
    fast = _step(run, "fast", StepStatus.RUNNING, attempt=1)
    slow = _step(run, "slow", StepStatus.RUNNING, attempt=1)
    run.active_steps = 2
    snapshot = Snapshot(run=run, focus=fast, loaded=frozenset({ACTIVE_STEPS, OPEN_WAITS}))
    snapshot.active = [snapshot.adopt(fast), snapshot.adopt(slow)]
    changes = _completed(snapshot, fast, {"text": "x"})
    assert changes.step_updates[slow.pk][1]["status"] == StepStatus.CANCELLED
    assert [s.node for s in changes.new_steps] == ["done"]
    assert run.active_steps == 1 and run.pending_joins == {}
    assert "step.cancelled" in _verbs(changes)


def test_a_dynamic_fan_out_releases_the_next_item_then_joins_outputs_in_item_order() -> None:
    run = _run("pure_map", text="t", items=["a", "b", "c"])
    parent = _step(run, "answer", StepStatus.RUNNING, kind=StepKind.MAP, agent="test_pure_echo")
    items = [
        _step(run, "answer", s, kind=StepKind.ITEM, item=i, parent=parent, input={"item": x})
        for i, (x, s) in enumerate([("a", "running"), ("b", "running"), ("c", "pending")])
    ]
    run.active_steps = 4
    snapshot = Snapshot(run=run, focus=items[1], loaded=frozenset({"map_progress"}))
    snapshot.map_progress = MapProgress(parent=parent, next_pending=items[2], others_active=1)
    changes = _completed(snapshot, items[1], {"text": "echo:b"})
    assert changes.step_updates[items[2].pk][1]["status"] == StepStatus.QUEUED
    assert [w.step for w in changes.wakeups] == [items[2]]
    # The last item to finish (item 0, after 2) joins every output in item order.
    last = Snapshot(run=run, focus=items[0], loaded=frozenset({"map_progress"}))
    last.map_progress = MapProgress(
        parent=parent,
        next_pending=None,
        others_active=0,
        outputs={2: {"text": "echo:c"}, 1: {"text": "echo:b"}},
    )
    run.node_visits = {"start": 1, "answer": 1}
    done = _completed(last, items[0], {"text": "echo:a"})
    assert run.state["answers"] == [{"text": "echo:a"}, {"text": "echo:b"}, {"text": "echo:c"}]
    assert [s.node for s in done.new_steps] == ["summary"]


def test_an_edited_approval_becomes_a_state_version_written_by_the_operator() -> None:
    run = _run(
        "refund_desk",
        proposal={"order_id": "o", "amount": 226.0, "currency": "EUR", "reason": "damaged"},
    )
    run.status, run.waiting_steps, run.active_steps = RunStatus.WAITING, 1, 1
    step = _step(run, "execute_refund", StepStatus.WAITING, agent="refund_executor")
    wait = Wait(
        pk=next(_ids),
        run=run,
        step=step,
        kind=WaitKind.APPROVAL,
        name="execute_refund",
        tier=1,
        deadline_at=NOW,
        on_timeout="reject",
        created_at=NOW,
        status=WaitStatus.APPROVED,
    )
    edited = {"proposal": {"order_id": "o", "amount": 99.0, "currency": "EUR", "reason": "damaged"}}
    changes = advance.approval_decided(
        Snapshot(run=run, focus=step),
        NOW,
        wait=wait,
        step=step,
        decision="edit",
        reason="too much",
        edited_input=edited,
        actor_type="human",
        actor_id="alice",
    )
    assert [(v.key, v.version, v.writer, v.value["amount"]) for v in changes.state_versions] == [
        ("proposal", 2, "operator:alice", 99.0)
    ]
    # What executes is built from state again, and the approval is bound to it.
    action = advance.step_action(
        step, advance.node_of(advance.RunAdvance(Snapshot(run=run), NOW).wf, step), run
    )
    assert action["input"]["proposal"]["amount"] == 99.0
    assert step.input_override is None and step.status == StepStatus.QUEUED


def test_failing_a_run_needs_its_active_steps_waits_and_what_it_may_undo() -> None:
    run = _run("saga", text="t")
    with pytest.raises(Missing) as missing:
        advance.run_cancelled(
            Snapshot(run=run), NOW, reason="stop", actor_type="human", actor_id="alice"
        )
    assert missing.value.needs == {ACTIVE_STEPS, OPEN_WAITS, DONE_STEPS}
