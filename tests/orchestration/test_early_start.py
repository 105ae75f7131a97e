"""A worker sends a step's completion and starts the next step (a ``pure`` agent's) before the
commit is acknowledged. These tests hold steps at chosen points, in this process, against the
real PostgreSQL engine: what started early must never act before the commit it follows, and
when that commit does not go through as sent, the early work is dropped without a trace."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, connections

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.executor import step_execute
from orchestration.models import Run, Step
from orchestration.services import run_cancel, run_submit
from tests.conftest import ALL_POOLS, wait_until
from tests.support.agents import GatedAgent, PureEcho, PureEffect
from tests.support.stub_provider import stub_provider_server

pytestmark = [pytest.mark.django_db(transaction=True)]

if connection.vendor != "postgresql":  # pragma: no cover - the suite runs on PostgreSQL
    pytest.skip("completions are sent ahead only on PostgreSQL", allow_module_level=True)


@pytest.fixture(autouse=True)
def _in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}
    monkeypatch.setattr("orchestration.engine.publish_steps", lambda steps: None)
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
        lambda: Step.objects.filter(run=run, node=node, status="queued").first(), what=f"{node} queued"
    )


def _succeeded_once(run: Run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in Step.objects.filter(run=run):
        counts[step.node] = AuditEvent.objects.filter(step_id=step.pk, verb=Verb.STEP_SUCCEEDED).count()
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
