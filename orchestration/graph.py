"""The workflow graph's decisions, as pure functions: what becomes ready when a node finishes.

No database, no clock, no randomness: each function takes the definition and the facts it
needs (visits, join arrivals, a route's choice, a map's items) and returns what follows. The
engine's advance (``orchestration.advance``) applies the answers to a run; tests call these
directly (``tests/orchestration/test_graph.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from orchestration.definition import END, FAIL, Node, StateReader, Workflow
from orchestration.errors import Code, LimitExceeded, SignalboxError, StateAccessDenied

#: A node may run at most this many times in one run unless its route declares a loop_limit.
DEFAULT_MAX_VISITS = 10

#: What a wait's ``on_timeout`` may say besides a node name.
CONTINUE = "continue"


# --- joins ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinArrival:
    """What one predecessor's arrival at a join does."""

    #: The predecessors that have arrived, this one included (in arrival order).
    arrived: tuple[str, ...]
    #: The join has what it needs: the node runs now.
    released: bool
    #: Predecessors still running that lost the race of an any / first-N join: they are
    #: cancelled, so a late arrival cannot release the join a second time.
    losers: tuple[str, ...] = ()


def join_arrive(node: Node, arrived: Sequence[str], pred: str) -> JoinArrival:
    """``pred`` finished; ``arrived`` are the predecessors that had arrived at ``node`` before."""
    now_arrived = tuple(arrived) if pred in arrived else (*arrived, pred)
    if len(now_arrived) < node.join_needed():
        return JoinArrival(now_arrived, released=False)
    losers = () if node.join == "all" else tuple(p for p in node.after if p not in now_arrived)
    return JoinArrival(now_arrived, released=True, losers=losers)


# --- routes and loops -------------------------------------------------------------------------


def route_choose(node: Node, state: StateReader) -> str:
    """Run a route node's ``choose`` and check its answer is one of the node's targets."""
    assert node.choose is not None
    try:
        target = node.choose(state)
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
    return str(target)


def routing_agent_target(node: Node, output: Mapping[str, Any]) -> tuple[Any, str]:
    """(choice, target) of a routing agent: the output field that names the path, and the node
    that path leads to."""
    choice = output.get(node.route_field)
    target = node.routes.get(str(choice)) if choice is not None else None
    if target is None:
        raise SignalboxError(
            f"routing agent {node.name!r} chose {choice!r}; expected one of {sorted(node.routes)}",
            code=Code.ROUTE_INVALID_CHOICE,
            detail={"chosen": choice, "routes": sorted(node.routes)},
        )
    return choice, target


@dataclass(frozen=True)
class LoopBound:
    """A route would run ``target`` once more than its bound allows; ``taken`` runs instead."""

    target: str
    limit: int
    taken: str


def loop_check(
    router: Node, target: str, visits: Mapping[str, int], *, cap: int | None = None
) -> LoopBound | None:
    """Whether following ``router`` to ``target`` passes the loop bound (None: it does not).
    A target that ran before is a loop; it may run ``loop_limit`` times (default 10), and never
    more than ``cap`` (the policy's ``max_loop_iterations``)."""
    if target in (END, FAIL) or visits.get(target, 0) < 1:
        return None
    limit = router.loop_limit or DEFAULT_MAX_VISITS
    if cap is not None:
        limit = min(limit, cap)
    if visits[target] < limit:
        return None
    return LoopBound(target=target, limit=limit, taken=router.on_loop_limit)


def loop_bound_error(router: Node, bound: LoopBound) -> LimitExceeded:
    return LimitExceeded(
        f"run stopped by the loop bound of {router.name!r}: {bound.target!r} may run {bound.limit} times",
        code=Code.LOOP_LIMIT,
        detail={
            "bound": "loop_limit",
            "node": router.name,
            "target": bound.target,
            "limit": bound.limit,
        },
    )


def route_failed(router: Node) -> SignalboxError:
    return SignalboxError(f"route {router.name!r} chose to fail the run", code=Code.ROUTE_FAILED)


# --- bounds -----------------------------------------------------------------------------------


def step_bound_check(wf: Workflow, step_count: int) -> None:
    """One more step would pass the workflow's ``max_steps``: the run stops."""
    if step_count + 1 > wf.max_steps:
        raise LimitExceeded(
            f"run stopped by its max_steps bound ({wf.max_steps})",
            code=Code.MAX_STEPS,
            detail={"bound": "max_steps", "limit": wf.max_steps},
        )


def run_deadline_error(allowed: timedelta) -> LimitExceeded:
    """The run passed its deadline, ``allowed`` after it was submitted (its workflow's
    ``max_duration``, or the policy's ``run_deadline``)."""
    return LimitExceeded(
        f"run stopped by its deadline ({allowed} after it was submitted)",
        code=Code.RUN_DEADLINE,
        detail={"bound": "max_duration"},
    )


# --- dynamic fan-out (map) --------------------------------------------------------------------


def map_items(node: Node, value: Any, *, cap: int | None = None) -> list[Any]:
    """The elements a map node fans out to: a list in state, within the node's bound and
    ``cap`` (the policy's ``max_fan_out``), whichever is smaller."""
    if not isinstance(value, list):
        raise SignalboxError(
            f"map {node.name!r} needs a list in state key {node.items!r}",
            code=Code.MAP_ITEMS_INVALID,
            detail={"key": node.items, "type": type(value).__name__},
        )
    limit = node.max_items if cap is None else min(node.max_items, cap)
    if len(value) > limit:
        bound = "max_items" if limit == node.max_items else "policy max_fan_out"
        by_policy = " (the policy's max_fan_out)" if bound != "max_items" else ""
        raise LimitExceeded(
            f"map {node.name!r} got {len(value)} items; its bound is {limit}{by_policy}",
            code=Code.FANOUT_LIMIT,
            detail={"bound": bound, "node": node.name, "limit": limit, "got": len(value)},
        )
    return value


def map_item_input(item: Any) -> dict[str, Any]:
    """What one item's agent is given: the element itself if it is an object, else ``{"item": x}``."""
    return item if isinstance(item, dict) else {"item": item}


def map_item_queued(node: Node, index: int) -> bool:
    """Items start queued up to the node's ``concurrency``; the rest wait (pending) their turn."""
    return index < node.concurrency


@dataclass(frozen=True)
class MapProgress:
    """A map's items as seen when one of them succeeds (the one succeeding excluded)."""

    #: The map's own step.
    parent: Any
    #: The lowest-numbered item still pending (held back by ``concurrency``), if any.
    next_pending: Any | None
    #: How many other items are queued, running or waiting.
    others_active: int
    #: Outputs of the other items that succeeded, by item index (read only when the map is done).
    outputs: Mapping[int, Any] | None = None


def map_after_item(progress: MapProgress) -> str:
    """What an item's success does to its map: ``"release"`` the next pending item, ``"wait"``
    for others still active, or ``"finish"`` the map (every item is done)."""
    if progress.next_pending is not None:
        return "release"
    if progress.others_active > 0:
        return "wait"
    return "finish"


def map_outputs(outputs: Mapping[int, Any], index: int, output: Any) -> list[Any]:
    """Every item's output in item order, this item's (``index``) included."""
    by_item = {**outputs, index: output}
    return [by_item[i] for i in sorted(by_item)]


# --- waits ------------------------------------------------------------------------------------


def wait_deadline(node: Node, now: datetime) -> datetime:
    assert node.wait_timeout is not None
    return now + node.wait_timeout


@dataclass(frozen=True)
class EventTimeout:
    """What an event wait's timeout does: fail the step, continue to the successors (with a
    ``timed_out`` payload), end that branch, or activate a declared node."""

    kind: str  # "fail" | "continue" | "end" | "goto"
    node: str = ""


def event_timeout(on_timeout: str) -> EventTimeout:
    if on_timeout in (FAIL, "fail"):
        return EventTimeout("fail")
    if on_timeout == CONTINUE:
        return EventTimeout("continue")
    if on_timeout == END:
        return EventTimeout("end")
    return EventTimeout("goto", on_timeout)


def timed_out_payload(event: str) -> dict[str, Any]:
    return {"timed_out": True, "event": event}


def approval_deadline(node: Node, now: datetime) -> datetime:
    assert node.approval is not None
    return now + node.approval.timeout


def escalation_deadline(wf: Workflow, node: Node, now: datetime) -> datetime:
    return now + wf.escalation_timeout_of(node)


def deadline_of(wf: Workflow, now: datetime, cap: timedelta | None = None) -> datetime:
    """When a run submitted ``now`` must have finished: its workflow's ``max_duration``, or
    ``cap`` (the policy's ``run_deadline``) if that is sooner."""
    duration = wf.max_duration if cap is None else min(wf.max_duration, cap)
    return now + duration


def lease_until(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)
