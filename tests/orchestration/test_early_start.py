"""A worker sends a step's completion and starts the next step (a ``pure`` agent's) before the
commit is acknowledged. These tests hold steps at chosen points, in this process, against the
real PostgreSQL engine: what started early must never act before the commit it follows, and
when that commit does not go through as sent, the early work is dropped without a trace."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, connections

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Step
from orchestration.services import run_cancel, run_send_event, run_submit
from policies.models import Reservation, ReservationStatus, SpendScope
from policies.services import policy_install
from tests.conftest import ALL_POOLS, wait_until
from tests.policies.documents import PRICED as PRICED_RUN
from tests.policies.documents import PRICED_CALL
from tests.support.agents import GatedAgent, PureEcho, PureEffect
from tests.support.engine import runtime_for, step_claim, step_execute, step_run
from tests.support.stub_provider import stub_provider_server

pytestmark = [pytest.mark.django_db(transaction=True)]

if connection.vendor != "postgresql":  # pragma: no cover - the suite runs on PostgreSQL
    pytest.skip("completions are sent ahead only on PostgreSQL", allow_module_level=True)


@pytest.fixture(autouse=True)
def _in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)
    GatedAgent.reset()
    PureEcho.starts.clear()
    PureEffect.events.clear()
    yield
    GatedAgent.gate.set()  # never leave a worker thread waiting


def _in_thread(target: Callable[[], Any]) -> threading.Thread:
    def body() -> None:
        try:
            target()
        finally:
            connections.close_all()  # this thread's connection, before the test database goes

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _queued(run: Run, node: str) -> Step:
    return wait_until(
        lambda: Step.objects.filter(run=run, node=node, status="queued").first(),
        what=f"{node} queued",
    )


def _succeeded_once(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in Step.objects.filter(run=run):
        counts[step.node] = AuditEvent.objects.filter(
            step_id=step.pk, verb=Verb.STEP_SUCCEEDED
        ).count()
    return counts


def test_the_next_step_starts_before_the_commit_and_its_tool_call_waits_for_it(monkeypatch):
    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        run = run_submit(workflow="early_effect", input={"text": "x"}).run
        first = _queued(run, "first")
        worker = _in_thread(lambda: step_execute(first.pk, worker_id="w1", pools=ALL_POOLS))
        assert GatedAgent.entered.wait(10)
        # Another transaction holds the run row: first's completion, once sent, waits for it.
        locked = threading.Event()
        release = threading.Event()

        def hold_run_row() -> None:
            from django.db import transaction

            with transaction.atomic():
                Run.objects.select_for_update().get(pk=run.pk)
                locked.set()
                release.wait(20)

        holder = _in_thread(hold_run_row)
        assert locked.wait(10)
        GatedAgent.gate.set()
        # "act" starts while first's commit is still waiting for the lock ...
        wait_until(lambda: PureEffect.events, what="act to start ahead of first's commit")
        worker.join(0.5)
        # ... and its effect on the world waits for that commit.
        assert stub.count == 0 and PureEffect.events == ["started"]
        assert not Step.objects.filter(run=run, node="act").exists()
        release.set()
        holder.join(10)
        worker.join(20)
        assert not worker.is_alive()
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert PureEffect.events == ["started", "called"]
    assert stub.count == 1 and stub.effects_applied == 1
    assert _succeeded_once(run) == {"first": 1, "act": 1}


def test_a_step_started_ahead_of_a_commit_that_must_be_redone_is_dropped_and_run_again():
    run = run_submit(workflow="early_branches", input={"text": "x"}).run
    start = _queued(run, "start")
    worker = _in_thread(lambda: step_execute(start.pk, worker_id="w1", pools=ALL_POOLS))
    assert GatedAgent.entered.wait(10)
    # While "a" runs, another worker completes "b": the run row changes under a's completion,
    # which is sent with the version it read, refused, and redone with the row read again.
    b = _queued(run, "b")
    assert step_execute(b.pk, worker_id="w2", pools=frozenset()) == 1
    GatedAgent.gate.set()
    worker.join(20)
    assert not worker.is_alive()
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    # "c" started ahead of a's refused commit: that start was dropped, and c ran again after
    # the redone commit. One step row, one recorded success, state written once.
    assert PureEcho.starts.count("c") == 2
    assert _succeeded_once(run) == {"start": 1, "a": 1, "b": 1, "c": 1}
    assert run.state["c"] == "echo:gated:echo:x"
    assert run.state_versions["c"] == 1


def test_a_step_started_ahead_of_a_commit_that_lost_its_lease_leaves_nothing_behind():
    run = run_submit(workflow="early_chain", input={"text": "x"}).run
    first = _queued(run, "first")
    worker = _in_thread(lambda: step_execute(first.pk, worker_id="w1", pools=ALL_POOLS))
    assert GatedAgent.entered.wait(10)
    # "held" started ahead of first's commit; the cancellation comes once that commit is in.
    wait_until(lambda: Step.objects.filter(run=run, node="held").exists(), what="first's commit")
    run_cancel(run_id=run.pk, user=None, reason="changed my mind")
    GatedAgent.gate.set()
    worker.join(20)
    assert not worker.is_alive()
    run.refresh_from_db()
    assert run.status == "cancelled"
    held = Step.objects.get(run=run, node="held")
    assert held.status == "cancelled" and held.output is None
    # "last" started ahead of held's completion, which the cancellation refused: no step row,
    # no audit row, no state; only this process knows it ever started.
    assert PureEcho.starts == ["first", "last"]
    assert not Step.objects.filter(run=run, node="last").exists()
    assert "last" not in run.state
    assert _succeeded_once(run) == {"first": 1, "held": 0}


# --- pure siblings committed together ----------------------------------------------------------


def _claims(step: Step) -> list[str]:
    return list(
        AuditEvent.objects.filter(step_id=step.pk, verb=Verb.STEP_CLAIMED).values_list(
            "actor_id", flat=True
        )
    )


def test_a_pure_sibling_another_worker_took_meanwhile_is_dropped_and_the_first_commits_alone():
    run = run_submit(workflow="pure_siblings", input={"text": "x"}).run
    start = _queued(run, "start")
    worker = _in_thread(lambda: step_execute(start.pk, worker_id="w1", pools=ALL_POOLS))
    assert GatedAgent.entered.wait(10)
    # "b" runs on w1 before a's completion is sent; meanwhile w2 claims it (its message went out).
    taken = step_claim(Step.objects.get(run=run, node="b").pk, "w2")
    assert taken is not None
    GatedAgent.gate.set()
    worker.join(20)
    assert not worker.is_alive()
    # a's completion was refused with b's claim in it, and went again alone.
    a = Step.objects.get(run=run, node="a")
    assert a.status == "succeeded"
    assert Step.objects.get(pk=taken.pk).status == "running"
    assert step_run(taken, worker_id="w2", pools=frozenset()) is None
    joined = _queued(run, "joined")
    step_execute(joined.pk, worker_id="w2", pools=ALL_POOLS)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert GatedAgent.starts == ["b", "b"]  # w1's early run was dropped; w2's counts
    assert _claims(Step.objects.get(pk=taken.pk)) == ["w2"]
    assert _succeeded_once(run) == {"start": 1, "a": 1, "b": 1, "joined": 1}


def test_pure_siblings_whose_run_changed_meanwhile_are_committed_again_from_the_row_as_it_is():
    run = run_submit(workflow="pure_siblings", input={"text": "x"}).run
    start = _queued(run, "start")
    worker = _in_thread(lambda: step_execute(start.pk, worker_id="w1", pools=ALL_POOLS))
    assert GatedAgent.entered.wait(10)
    # An outside event reaches the run while "b" runs ahead: the run row changes under a's
    # completion (not sent yet), which then goes again, read afresh, with b claimed properly.
    run_send_event(run_id=run.pk, name="unrelated", event_id="e-1", payload={"n": 1}, user=None)
    GatedAgent.gate.set()
    worker.join(20)
    assert not worker.is_alive()
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert GatedAgent.starts == ["b", "b"]
    assert _claims(Step.objects.get(run=run, node="b")) == ["w1"]
    assert _succeeded_once(run) == {"start": 1, "a": 1, "b": 1, "joined": 1}
    assert run.state["joined"] == "echo:echo:x"


def test_a_pure_sibling_that_acts_on_the_world_is_claimed_first(monkeypatch):
    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        run = run_submit(workflow="pure_effect_siblings", input={"text": "x"}).run
        step_execute(_queued(run, "start").pk, worker_id="w1", pools=ALL_POOLS)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert stub.count == 1 and PureEffect.events == ["started", "called"]
    a, b = Step.objects.get(run=run, node="a"), Step.objects.get(run=run, node="b")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT step_id, verb, xmin::text FROM audit_auditevent WHERE step_id IN (%s, %s)",
            [a.pk, b.pk],
        )
        xmin = {(step_id, verb): x for step_id, verb, x in cursor.fetchall()}
    # b's tool call needed its claim: a's completion went out with it before the call ...
    assert xmin[(b.pk, Verb.STEP_CLAIMED)] == xmin[(a.pk, Verb.STEP_SUCCEEDED)]
    # ... and b committed its own outcome afterwards.
    assert xmin[(b.pk, Verb.STEP_SUCCEEDED)] != xmin[(a.pk, Verb.STEP_SUCCEEDED)]
    assert _succeeded_once(run) == {"start": 1, "a": 1, "b": 1, "joined": 1}


@pytest.mark.parametrize("count", [2, 5])
def test_pure_map_items_are_joined_in_order_when_their_completions_go_together(count):
    # With two items, the second runs before the first's completion is sent; completing it must
    # see the first one done, which only a query after that completion can tell.
    items = [{"text": f"item {i}"} for i in range(count)]
    run = run_submit(workflow="pure_map", input={"text": "x", "items": items}).run
    step_execute(_queued(run, "start").pk, worker_id="w1", pools=ALL_POOLS)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert run.state["answers"] == [{"text": f"echo:item {i}"} for i in range(count)]
    answers = Step.objects.filter(run=run, node="answer", kind="item").order_by("item")
    assert [s.item for s in answers] == list(range(count))
    assert all(s.status == "succeeded" for s in answers)
    for step in answers:
        assert AuditEvent.objects.filter(step_id=step.pk, verb=Verb.STEP_SUCCEEDED).count() == 1


# --- priced pure siblings: the second is reserved by the commit that hands it off --------------

PRICED = PRICED_RUN % "1.00"
CALL = PRICED_CALL


def _spend(run: Run) -> tuple[Decimal, Decimal]:
    scope = SpendScope.objects.get(kind="run", key=str(run.pk))
    return scope.spent, scope.reserved


def _calls(run: Run) -> dict[int, tuple[Decimal | None, int | None]]:
    """Every call the run's steps made, by step id: (what it cost, the block it was taken
    from). A call of its own, or one whose completion was not written, is a ledger row; one
    taken from a block by an attempt that succeeded is on its step's row."""
    calls = {
        r.step_id: (r.actual, r.block_id)
        for r in Reservation.objects.filter(run_id=run.pk, kind="call")
        if r.step_id is not None
    }
    for step in Step.objects.filter(run=run, block_call__isnull=False):
        cost = step.block_call["cost"]
        calls[step.pk] = (None if cost is None else Decimal(cost), step.block_call["block"])
    return calls


def test_a_pure_sibling_is_reserved_by_the_commit_that_hands_it_off_and_runs_ahead_on_it():
    policy_install(source=PRICED, note="early start tests")
    run = run_submit(workflow="priced_siblings", input={"text": "x"}).run
    start = _queued(run, "start")
    step_execute(start.pk, worker_id="w1", pools=ALL_POOLS)
    runtime_for(ALL_POOLS).settling.flush()  # the chain's block, done with

    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    steps = {step.node: step for step in Step.objects.filter(run=run)}
    # Each step's call is recorded once, for what it cost: "start" and "b" with reservations of
    # their own, "a" and "joined" from the budget block asked for in the batch that claimed "a"
    # (recorded on their step rows).
    calls = _calls(run)
    assert sorted(calls) == sorted(step.pk for step in steps.values())
    assert {actual for actual, _ in calls.values()} == {CALL}
    [block] = Reservation.objects.filter(run_id=run.pk, kind="block")
    assert (block.step_id, block.status, block.actual) == (steps["a"].pk, "settled", 2 * CALL)
    assert {calls[steps[n].pk][1] for n in ("a", "joined")} == {block.pk}
    assert {calls[steps[n].pk][1] for n in ("start", "b")} == {None}
    held = {r.step_id: r for r in Reservation.objects.filter(run_id=run.pk, kind="call")}
    # "b" was reserved in start's completion (which handed it off), to the microsecond: no
    # transaction of its own before it ran ahead of a's completion and joined it.
    assert held[steps["b"].pk].created_at == steps["start"].finished_at
    with connection.cursor() as cursor:  # a and b were last written by one transaction
        cursor.execute(
            f"SELECT DISTINCT xmin::text FROM {Step._meta.db_table} WHERE id IN (%s, %s)",
            [steps["a"].pk, steps["b"].pk],
        )
        assert len(cursor.fetchall()) == 1
    assert _spend(run) == (4 * CALL, 0)


def test_a_sibling_reserved_ahead_that_another_worker_took_is_charged_once_per_run_of_it():
    policy_install(source=PRICED, note="early start tests")
    run = run_submit(workflow="priced_gated_siblings", input={"text": "x"}).run
    start = _queued(run, "start")
    worker = _in_thread(lambda: step_execute(start.pk, worker_id="w1", pools=ALL_POOLS))
    assert GatedAgent.entered.wait(10)
    # While "a" is at its gate on w1, w2 takes "b" (reserved ahead by w1) and runs it.
    b = _queued(run, "b")  # a started before start's commit was acknowledged
    ahead = Reservation.objects.get(step_id=b.pk)
    assert (ahead.status, ahead.owner) == (ReservationStatus.HELD, "w1")
    taken = step_claim(b.pk, "w2")
    assert taken is not None
    step_run(taken, worker_id="w2", pools=frozenset())
    GatedAgent.gate.set()
    worker.join(20)
    assert not worker.is_alive()

    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    reservations = list(Reservation.objects.filter(run_id=run.pk))
    # Nothing is left held. w1 still ran "b" ahead of a's completion on what it had reserved
    # (the batch that hands b off cannot know another worker will take it); that completion
    # was refused and dropped, and its call is charged like any call made: start, b twice and
    # joined ("a" calls no model).
    assert {r.status for r in reservations} == {ReservationStatus.SETTLED}
    assert sorted(r.owner for r in reservations) == ["w1", "w1", "w1", "w2"]
    assert _spend(run) == (4 * CALL, 0)
    assert _succeeded_once(run) == {"start": 1, "a": 1, "b": 1, "joined": 1}


@pytest.mark.parametrize(
    "hint",
    [
        ["garbage"],  # an old or foreign message: read as no hint
        None,  # filled in below: the right shape, naming another run
    ],
)
def test_a_wake_up_hint_that_does_not_describe_its_step_leaves_nothing_reserved(hint):
    from orchestration.dispatch import wake_hint
    from orchestration.worker import execute

    policy_install(source=PRICED, note="early start tests")
    run = run_submit(workflow="priced_chain", input={"text": "x"}).run
    one = _queued(run, "one")
    if hint is None:
        hint = wake_hint(Step.objects.select_related("run").get(pk=one.pk))
        assert hint is not None
        hint[3] = run.pk + 1000  # another run's id
    execute.step_execute(one.pk, rt=runtime_for(ALL_POOLS), worker_id="w1", hint=hint)
    runtime_for(ALL_POOLS).settling.flush()  # the chain's block, done with

    run.refresh_from_db()
    assert run.status == "succeeded", run.error_message
    assert not Reservation.objects.filter(status=ReservationStatus.HELD).exists()
    mine = Reservation.objects.filter(run_id=run.pk)
    assert {r.status for r in mine} == {ReservationStatus.SETTLED}
    calls = _calls(run)  # (the chain's budget block besides)
    assert len(calls) == 3 and {actual for actual, _ in calls.values()} == {CALL}
    assert not Reservation.objects.exclude(run_id=run.pk).exists()
    assert _spend(run) == (3 * CALL, 0)
