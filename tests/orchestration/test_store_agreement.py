"""The fast PostgreSQL store and the plain one (the ORM, as embedded mode runs it) must leave
the same rows for the same work: the fast paths are an implementation of the same interface,
not another engine. Each workflow runs twice on PostgreSQL, once per store, with the same seed,
and the runs are compared as an operator or auditor would read them."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from django.db import transaction
from django.forms.models import model_to_dict
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration import runtime
from orchestration.models import Run, StateVersion, Step, StepStatus, Wait
from orchestration.runtime import Runtime
from orchestration.services import (
    approvals_decide_bulk,
    escalation_resolve,
    run_cancel,
    run_submit,
)
from orchestration.store import PostgresStore, Store
from orchestration.worker.execute import step_execute
from tests.conftest import ALL_POOLS
from tests.policies.documents import BOTH_BRANCHES_NEED_APPROVAL
from tests.support.stub_provider import stub_provider_server

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The side-effecting capability's provider: a local stub server."""
    with stub_provider_server("test-effect") as stub:
        monkeypatch.setenv("SIGNALBOX_TEST_ECHO_URL", stub.url)
        yield stub


@pytest.fixture(autouse=True)
def _quiet(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "AGENT_TIME_SCALE": 0.0,
        "LIVE_EVENTS": False,
        "RETRY_BASE_SECONDS": 0.0,
        "RETRY_MAX_SECONDS": 0.0,
    }
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


def _runtime(store: Store) -> Runtime:
    rt = Runtime(pools=ALL_POOLS)
    rt.store = store
    return runtime.install(rt)


def _drive(rt: Runtime, run_id: int) -> Run:
    for _ in range(50):
        queued = list(
            Step.objects.filter(run_id=run_id, status=StepStatus.QUEUED).values_list(
                "pk", flat=True
            )
        )
        if not queued:
            break
        for step_id in queued:
            Step.objects.filter(pk=step_id).update(
                available_at=Step.objects.get(pk=step_id).created_at
            )
            step_execute(step_id, rt=rt, worker_id="w")
    return Run.objects.get(pk=run_id)


def _as_read(run: Run) -> dict[str, Any]:
    steps = {s.pk: s.key for s in Step.objects.filter(run=run)}
    return {
        "run": (
            run.status,
            run.state,
            run.output,
            run.error_code,
            run.step_count,
            run.active_steps,
            run.waiting_steps,
            run.node_visits,
            run.degraded,
        ),
        "steps": sorted(
            (s.key, s.kind, s.status, s.attempt, s.failures, s.agent, repr(s.output), s.error_code)
            for s in Step.objects.filter(run=run)
        ),
        "state": sorted(
            (v.key, v.version, repr(v.value), v.writer)
            for v in StateVersion.objects.filter(run=run)
        ),
        "waits": sorted(
            (w.kind, w.name, w.status, w.decision) for w in Wait.objects.filter(run=run)
        ),
        "audit": Counter(
            (Verb(e.verb).label, e.object_type, steps.get(e.step_id or 0, ""))
            for e in AuditEvent.objects.filter(run_id=run.pk)
        ),
    }


def _both(work: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    seen = []
    for store in (PostgresStore(), Store()):
        rt = _runtime(store)
        try:
            seen.append(_as_read(work(rt)))
        finally:
            runtime.close()
    return seen[0], seen[1]


@pytest.mark.parametrize(
    ("workflow", "input"),
    [
        ("reference_workload", {"topic": "agreement"}),  # pure agents: supersteps on the fast store
        ("siblings", {"text": "t"}),  # a sibling claimed at the end of a chain
        (
            "pure_map",
            {"text": "t", "items": ["a", "b", "c", "d", "e"]},
        ),  # fan-out, bounded, joined in order
        ("first_wins", {"text": "t"}),  # an any-join cancels the loser
        ("flaky_chain", {"failures": 2}),  # retries with backoff
        ("saga", {"permanent": True}),  # a failure that compensates completed side effects
    ],
)
def test_the_fast_store_and_the_plain_store_leave_the_same_runs(
    workflow: str, input: dict[str, Any]
) -> None:
    def work(rt: Runtime) -> Run:
        run = run_submit(workflow=workflow, input=input, seed=42).run
        return _drive(rt, run.pk)

    fast, plain = _both(work)
    assert fast["run"][0] in ("succeeded", "failed") and fast["steps"] and fast["audit"]
    assert fast == plain


def test_both_stores_agree_on_an_escalation_skipped_by_an_operator(operator: Any) -> None:
    def work(rt: Runtime) -> Run:
        run = _drive(rt, run_submit(workflow="escalating", input={}, seed=7).run.pk)
        wait = Wait.objects.get(run=run, kind="escalation", status="open")
        escalation_resolve(
            wait_id=wait.pk,
            user=operator,
            action="skip",
            reason="known issue",
            output={"text": "by hand"},
        )
        return _drive(rt, run.pk)

    fast, plain = _both(work)
    assert fast == plain and fast["run"][0] == "succeeded"


def test_both_stores_agree_on_a_cancelled_run(operator: Any) -> None:
    def work(rt: Runtime) -> Run:
        run = run_submit(workflow="saga_waiting", input={}, seed=3).run
        run = _drive(rt, run.pk)
        run_cancel(run_id=run.pk, user=operator, reason="customer withdrew")
        return _drive(rt, run.pk)

    fast, plain = _both(work)
    assert fast == plain


def _stored(row: Any) -> dict[str, Any]:
    """A row's columns as an instance holds them, to compare with what is stored."""
    return {f.attname: getattr(row, f.attname) for f in type(row)._meta.concrete_fields}


def test_both_stores_close_an_approval_under_its_runs_lock_alike(operator: Any) -> None:
    def work(rt: Runtime) -> Run:
        run = _drive(
            rt,
            run_submit(
                workflow="reference_workload", input={"needs_approval": True}, seed=5
            ).run.pk,
        )
        wait = Wait.objects.get(run=run, kind="approval", status="open")
        decided = {
            "status": "approved",
            "decision": "approve",
            "decided_by": operator,
            "decided_at": timezone.now(),
            "decision_reason": "fine",
            "edited_input": None,
        }
        with transaction.atomic():
            locked, step = rt.store.wait_close_locked(run.pk, wait.pk, wait.step_id, **decided)
            # What the store returns is the run and the step as stored, the run locked.
            assert step is not None and step.run is locked
            assert _stored(locked) == _stored(Run.objects.get(pk=run.pk))
            assert _stored(step) == _stored(Step.objects.get(pk=wait.step_id))
            # A second close finds the approval decided: the run, no step, nothing written.
            again, none = rt.store.wait_close_locked(
                run.pk, wait.pk, wait.step_id, **{**decided, "decision_reason": "again"}
            )
            assert none is None and _stored(again) == _stored(locked)
        row = Wait.objects.get(pk=wait.pk)
        assert model_to_dict(
            row, fields=["status", "decision", "decided_by", "decision_reason"]
        ) == {
            "status": "approved",
            "decision": "approve",
            "decided_by": operator.pk,
            "decision_reason": "fine",
        }
        with pytest.raises(Run.DoesNotExist), transaction.atomic():
            rt.store.wait_close_locked(run.pk + 10_000, wait.pk, wait.step_id, **decided)
        with pytest.raises(RuntimeError):  # a lock outside a transaction would hold nothing
            rt.store.wait_close_locked(run.pk, wait.pk, wait.step_id, **decided)
        return run

    _both(work)


def test_both_stores_agree_on_a_bulk_decision(operator: Any) -> None:
    from policies.active import active_forget
    from policies.services import policy_install

    policy_install(source=BOTH_BRANCHES_NEED_APPROVAL, note="tests")
    active_forget()

    def work(rt: Runtime) -> Run:
        twin = _drive(rt, run_submit(workflow="reference_workload", input={}, seed=11).run.pk)
        lone = _drive(rt, run_submit(workflow="reference_workload", input={}, seed=12).run.pk)
        waits = list(Wait.objects.filter(run__in=[twin, lone], status="open").order_by("-pk"))
        assert len(waits) == 4
        # Both of the twin run's approvals and one of the other's, most recent first.
        asked = [w.pk for w in waits if w.run_id == twin.pk] + [
            waits[0].pk if waits[0].run_id == lone.pk else waits[1].pk
        ]
        outcomes = approvals_decide_bulk(wait_ids=asked, user=operator, reason="agreed")
        assert [o.ok for o in outcomes] == [True, True, True]
        _drive(rt, lone.pk)
        return _drive(rt, twin.pk)

    fast, plain = _both(work)
    assert fast == plain and fast["run"][0] == "succeeded"
