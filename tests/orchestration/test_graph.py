"""The graph's decisions (orchestration/graph.py): pure functions, no database, no worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel

from orchestration import graph
from orchestration.definition import END, FAIL, Workflow
from orchestration.errors import Code, LimitExceeded, SignalboxError, StateAccessDenied


class Loose(BaseModel):
    pass


def _join(join: str | int) -> Workflow:
    wf = Workflow(f"join_{join}", input=Loose)
    for name in ("a", "b", "c"):
        wf.agent(name, "noop")
    wf.agent("j", "noop", after=["a", "b", "c"], join=join)
    return wf.seal()


def test_an_all_join_waits_for_every_predecessor_and_cancels_nobody() -> None:
    node = _join("all").node("j")
    first = graph.join_arrive(node, [], "a")
    second = graph.join_arrive(node, first.arrived, "b")
    third = graph.join_arrive(node, second.arrived, "c")
    assert (first.released, second.released, third.released) == (False, False, True)
    assert third.arrived == ("a", "b", "c") and third.losers == ()


def test_an_any_join_releases_on_the_first_arrival_and_names_the_losers() -> None:
    arrival = graph.join_arrive(_join("any").node("j"), [], "b")
    assert arrival.released and arrival.losers == ("a", "c")


def test_a_first_n_join_releases_on_the_nth_arrival() -> None:
    node = _join(2).node("j")
    one = graph.join_arrive(node, [], "c")
    two = graph.join_arrive(node, one.arrived, "a")
    assert not one.released and two.released and two.losers == ("b",)


def test_the_same_predecessor_arriving_twice_counts_once() -> None:
    node = _join("all").node("j")
    arrival = graph.join_arrive(node, ["a"], "a")
    assert arrival.arrived == ("a",) and not arrival.released


def _loop(limit: int | None = None, on_limit: str = FAIL) -> Workflow:
    wf = Workflow(f"loop_{limit}_{on_limit}", input=Loose)
    wf.agent("brief", "noop")
    wf.agent("draft", "noop", after="brief")
    wf.agent("publish", "noop")
    wf.route(
        "gate",
        after="draft",
        choose=lambda s: "draft",
        targets=["draft", "publish"],
        loop_limit=limit,
        on_loop_limit=on_limit,
    )
    return wf.seal()


def test_a_loop_runs_until_its_bound_then_takes_the_declared_way() -> None:
    router = _loop(3, "publish").node("gate")
    assert graph.loop_check(router, "draft", {}) is None  # first visit: not a loop
    assert graph.loop_check(router, "draft", {"draft": 2}) is None
    bound = graph.loop_check(router, "draft", {"draft": 3})
    assert bound == graph.LoopBound(target="draft", limit=3, taken="publish")


def test_a_loop_without_a_declared_bound_stops_at_ten() -> None:
    router = _loop().node("gate")
    assert graph.loop_check(router, "draft", {"draft": 9}) is None
    bound = graph.loop_check(router, "draft", {"draft": 10})
    assert bound is not None and bound.limit == graph.DEFAULT_MAX_VISITS and bound.taken == FAIL
    error = graph.loop_bound_error(router, bound)
    assert error.code == Code.LOOP_LIMIT and error.detail["bound"] == "loop_limit"


def test_the_end_and_fail_targets_are_never_loops() -> None:
    router = _loop(1).node("gate")
    assert graph.loop_check(router, END, {END: 5}) is None


def test_a_route_must_choose_one_of_its_targets() -> None:
    wf = Workflow("routes", input=Loose)
    wf.agent("a", "noop")
    wf.agent("b", "noop")
    wf.route("r", after="a", choose=lambda s: s.get("go"), targets=["b"], reads=["go"])
    node = wf.seal().node("r")
    assert graph.route_choose(node, {"go": "b"}) == "b"
    assert graph.route_choose(node, {"go": END}) == END
    with pytest.raises(SignalboxError) as wrong:
        graph.route_choose(node, {"go": "elsewhere"})
    assert wrong.value.code == Code.ROUTE_INVALID_TARGET


def test_a_route_that_raises_fails_clearly_but_a_state_refusal_passes_through() -> None:
    wf = Workflow("routes_raise", input=Loose)
    wf.agent("a", "noop")
    wf.agent("b", "noop")

    def choose(state: object) -> str:
        raise KeyError("boom")

    wf.route("r", after="a", choose=choose, targets=["b"])
    node = wf.seal().node("r")
    with pytest.raises(SignalboxError) as broken:
        graph.route_choose(node, {})
    assert broken.value.code == Code.ROUTE_ERROR

    def snoop(state: object) -> str:
        raise StateAccessDenied("not declared")

    node.choose = snoop
    with pytest.raises(StateAccessDenied):
        graph.route_choose(node, {})


def test_a_routing_agent_picks_its_path_by_the_field_it_outputs() -> None:
    wf = Workflow("agent_routes", input=Loose)
    wf.agent("triage", "noop", routes={"refund": "refund", "question": "answer"})
    wf.agent("refund", "noop")
    wf.agent("answer", "noop")
    node = wf.seal().node("triage")
    assert graph.routing_agent_target(node, {"route": "refund"}) == ("refund", "refund")
    with pytest.raises(SignalboxError) as wrong:
        graph.routing_agent_target(node, {"route": "spam"})
    assert wrong.value.code == Code.ROUTE_INVALID_CHOICE and wrong.value.detail["routes"] == [
        "question",
        "refund",
    ]


def _map() -> Workflow:
    wf = Workflow("fanout", input=Loose)
    wf.agent("plan", "noop")
    wf.map(
        "work", "noop", after="plan", items="items", max_items=4, concurrency=2, writes=["results"]
    )
    return wf.seal()


def test_a_map_takes_a_list_within_its_bound() -> None:
    node = _map().node("work")
    assert graph.map_items(node, [1, 2, 3, 4]) == [1, 2, 3, 4]
    with pytest.raises(LimitExceeded) as too_many:
        graph.map_items(node, [1, 2, 3, 4, 5])
    assert too_many.value.code == Code.FANOUT_LIMIT and too_many.value.detail == {
        "bound": "max_items",
        "node": "work",
        "limit": 4,
        "got": 5,
    }
    with pytest.raises(SignalboxError) as not_a_list:
        graph.map_items(node, {"a": 1})
    assert not_a_list.value.code == Code.MAP_ITEMS_INVALID


def test_map_items_start_queued_up_to_the_concurrency_and_wrap_scalars() -> None:
    node = _map().node("work")
    assert [graph.map_item_queued(node, i) for i in range(4)] == [True, True, False, False]
    assert graph.map_item_input(7) == {"item": 7}
    assert graph.map_item_input({"q": 1}) == {"q": 1}


def test_an_item_success_releases_the_next_pending_then_waits_then_finishes() -> None:
    pending = graph.MapProgress(parent="map", next_pending="item-3", others_active=1)
    busy = graph.MapProgress(parent="map", next_pending=None, others_active=1)
    last = graph.MapProgress(
        parent="map", next_pending=None, others_active=0, outputs={0: "a", 2: "c"}
    )
    assert [graph.map_after_item(p) for p in (pending, busy, last)] == ["release", "wait", "finish"]


def test_map_outputs_are_in_item_order_whatever_order_items_finished() -> None:
    assert graph.map_outputs({2: "c", 0: "a", 3: "d"}, 1, "b") == ["a", "b", "c", "d"]


def test_a_wait_timeout_says_what_happens_next() -> None:
    assert graph.event_timeout(FAIL) == graph.EventTimeout("fail")
    assert graph.event_timeout("fail") == graph.EventTimeout("fail")
    assert graph.event_timeout("continue") == graph.EventTimeout("continue")
    assert graph.event_timeout(END) == graph.EventTimeout("end")
    assert graph.event_timeout("escalate_node") == graph.EventTimeout("goto", "escalate_node")
    assert graph.timed_out_payload("paid") == {"timed_out": True, "event": "paid"}


def test_deadlines_are_counted_from_now() -> None:
    wf = Workflow("waits", input=Loose, max_duration=timedelta(hours=2))
    wf.agent("a", "noop")
    wf.wait("w", event="paid", after="a", timeout=timedelta(minutes=30))
    wf.seal()
    now = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    assert graph.wait_deadline(wf.node("w"), now) == now + timedelta(minutes=30)
    assert graph.deadline_of(wf, now) == now + timedelta(hours=2)


def test_one_step_more_than_max_steps_stops_the_run() -> None:
    wf = Workflow("bounded", input=Loose, max_steps=3)
    wf.agent("a", "noop")
    wf.seal()
    graph.step_bound_check(wf, 2)
    with pytest.raises(LimitExceeded) as stopped:
        graph.step_bound_check(wf, 3)
    assert stopped.value.code == Code.MAX_STEPS


def test_the_policys_loop_bound_caps_a_looser_declared_one_but_never_loosens_it() -> None:
    router = _loop(5, "publish").node("gate")
    assert graph.loop_check(router, "draft", {"draft": 2}, cap=3) is None
    bound = graph.loop_check(router, "draft", {"draft": 3}, cap=3)
    assert bound == graph.LoopBound(target="draft", limit=3, taken="publish")
    # A looser cap than the workflow's own bound changes nothing.
    assert graph.loop_check(router, "draft", {"draft": 4}, cap=50) is None
    assert graph.loop_check(router, "draft", {"draft": 5}, cap=50) is not None


def test_the_policys_fan_out_bound_caps_a_map_and_names_itself() -> None:
    node = _map().node("work")
    assert graph.map_items(node, [1, 2], cap=2) == [1, 2]
    with pytest.raises(LimitExceeded) as too_many:
        graph.map_items(node, [1, 2, 3], cap=2)
    assert too_many.value.detail == {
        "bound": "policy max_fan_out",
        "node": "work",
        "limit": 2,
        "got": 3,
    }
    assert graph.map_items(node, [1, 2, 3, 4], cap=100) == [
        1,
        2,
        3,
        4,
    ]  # the node's own bound holds


def test_a_runs_deadline_is_the_sooner_of_its_workflows_and_the_policys() -> None:
    wf = _map()
    now = datetime(2026, 3, 1, tzinfo=UTC)
    assert graph.deadline_of(wf, now) == now + wf.max_duration
    assert graph.deadline_of(wf, now, timedelta(minutes=5)) == now + timedelta(minutes=5)
    assert graph.deadline_of(wf, now, wf.max_duration * 2) == now + wf.max_duration
