"""Planning compensations (orchestration/compensation.py): pure, no database, no worker."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel

from orchestration import compensation
from orchestration.definition import Workflow


@dataclass
class Done:
    pk: int
    node: str
    finished_at: datetime
    degraded: str = ""


T0 = datetime(2026, 12, 5, tzinfo=UTC)


def _wf() -> Workflow:
    wf = Workflow("saga_plan", input=BaseModel)
    wf.agent("reserve", "noop", compensate="unreserve")
    wf.agent("lookup", "noop", after="reserve")
    wf.agent("charge", "noop", after="lookup", compensate="refund")
    return wf.seal()


def test_completed_side_effects_are_undone_newest_first_and_one_at_a_time() -> None:
    steps = [
        Done(1, "reserve", T0),
        Done(2, "lookup", T0 + timedelta(seconds=1)),
        Done(3, "charge", T0 + timedelta(seconds=2)),
    ]
    plan = compensation.compensations(_wf(), compensation.newest_first(steps, None))
    assert [(u.original.node, u.agent, u.queued) for u in plan] == [
        ("charge", "refund", True),
        ("reserve", "unreserve", False),
    ]


def test_the_step_whose_success_failed_the_run_counts_as_the_newest() -> None:
    steps = [Done(1, "reserve", T0 + timedelta(seconds=5))]
    trigger = Done(3, "charge", T0)
    ordered = compensation.newest_first(steps, trigger)
    assert [s.node for s in ordered] == ["charge", "reserve"]


def test_a_step_an_operator_skipped_has_nothing_to_undo() -> None:
    steps = [
        Done(1, "reserve", T0),
        Done(3, "charge", T0 + timedelta(seconds=1), degraded="skipped by alice"),
    ]
    plan = compensation.compensations(_wf(), compensation.newest_first(steps, None))
    assert [u.original.node for u in plan] == ["reserve"]


def test_a_cancelled_run_ends_cancelled_and_any_other_failure_failed() -> None:
    assert compensation.final_status("cancelled") == "cancelled"
    assert compensation.final_status("max_attempts") == "failed"
    assert compensation.undo_node_name("charge") == "undo:charge"
    assert compensation.undone_node("undo:charge") == "charge"
