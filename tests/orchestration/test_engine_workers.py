"""The engine end to end: PostgreSQL, Redis and real Celery worker processes."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration import recovery
from orchestration.errors import Conflict
from orchestration.models import Run, StateVersion, Step, Wait
from orchestration.services import approval_decide, run_send_event, run_submit
from tests.conftest import wait_for_run, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def open_wait(run: Run, kind: str = "approval", name: str | None = None) -> Wait:
    def find() -> Wait | None:
        qs = Wait.objects.filter(run=run, kind=kind, status="open")
        if name:
            qs = qs.filter(name=name)
        return qs.order_by("id").first()

    return wait_until(find, what=f"an open {kind} wait on run {run.pk}")


def steps(run: Run) -> dict[str, Step]:
    return {s.key: s for s in Step.objects.filter(run=run).order_by("id")}


def test_content_pipeline_runs_to_completion_after_approval(workers):
    run = run_submit(workflow="content_pipeline", input={"topic": "durable agents"}, seed=11).run
    wait = open_wait(run)
    assert wait.step.node == "publish"
    assert wait.action["agent"] == "publisher"
    approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="looks good")
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", run.error_message
    by_key = steps(run)
    assert {"classify", "research_a", "research_b", "draft", "review", "publish"} <= set(by_key)
    drafts = [k for k in by_key if k.startswith("draft")]
    assert 1 <= len(drafts) <= 3  # the review loop is bounded at three drafts
    # both research branches joined before the first draft started
    assert by_key["draft"].started_at >= max(
        by_key["research_a"].finished_at, by_key["research_b"].finished_at
    )
    assert "published" in str(run.output).lower() or run.state


def test_refund_desk_waits_for_settlement_then_notifies(workers):
    run = run_submit(workflow="refund_desk", input={}, seed=3).run
    # Whatever the triage chose, drive the run through its approvals and settlement event.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.is_terminal:
            break
        wait = Wait.objects.filter(run=run, status="open").first()
        if wait and wait.kind == "approval":
            approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="ok")
        elif wait and wait.kind == "event":
            run_send_event(
                run_id=run.pk,
                name=wait.name,
                event_id="settle-1",
                payload={"status": "settled"},
                user=None,
            )
        time.sleep(0.05)
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", run.error_message
    by_node = {s.node for s in Step.objects.filter(run=run)}
    assert "triage" in by_node and "notify_customer" in by_node


def test_research_brief_fans_out_within_bounds_and_joins_in_order(workers):
    run = run_submit(workflow="research_brief", input={}, seed=5).run
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", run.error_message
    items = list(Step.objects.filter(run=run, kind="item").order_by("item"))
    planned = run.state["subquestions"]
    assert 2 <= len(items) == len(planned) <= 6
    # joined in item order, whatever order the items finished in
    answers = run.state["answers"]
    assert len(answers) == len(planned)
    for index, answer in enumerate(answers):
        assert str(planned[index]["index"]) in str(answer) or answer == items[index].output
    # never more than the declared concurrency (3) ran at once
    spans = [(s.started_at, s.finished_at) for s in items]
    overlap = max(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)
    assert overlap <= 3


def test_fanout_over_its_maximum_stops_the_run_with_the_bound(workers):
    run = run_submit(workflow="oversized_fanout", input={"count": 8}).run
    run = wait_for_run(run.pk)
    assert run.status == "failed"
    assert run.error_code == "fanout_limit"
    assert "bound is 6" in run.error_message
    assert not Step.objects.filter(run=run, kind="item").exists()


def test_loop_stops_at_its_bound_and_says_so(workers):
    run = run_submit(workflow="endless_review", input={}).run
    run = wait_for_run(run.pk)
    assert run.status == "failed"
    assert run.error_code == "loop_limit"
    assert "loop bound" in run.error_message
    assert Step.objects.filter(run=run, node="draft").count() == 3
    assert AuditEvent.objects.filter(run_id=run.pk, verb=Verb.RUN_LIMIT_HIT).exists()


def test_contract_violation_is_recorded_and_never_handed_on(workers):
    run = run_submit(workflow="bad_handoff", input={}).run
    run = wait_for_run(run.pk)
    assert run.status == "failed"
    produce = Step.objects.get(run=run, node="produce")
    assert produce.error_class == "contract"
    assert produce.error_code == "output_contract"
    assert produce.error_detail["payload"] == {
        "summary": "truncated respo",
        "score": "not-a-number",
    }
    assert produce.attempts_log and produce.attempts_log[0]["class"] == "contract"  # not retried
    assert len(produce.attempts_log) == 1
    assert not Step.objects.filter(run=run, node="consume").exists()
    assert "summary" not in run.state
    assert AuditEvent.objects.filter(
        run_id=run.pk, verb=Verb.STEP_CONTRACT_VIOLATION, step_id=produce.pk
    ).exists()


def test_state_key_outside_the_declaration_is_refused(workers):
    run = run_submit(workflow="snooping", input={}).run
    run = wait_for_run(run.pk)
    assert run.status == "failed"
    snoop = Step.objects.get(run=run, node="snoop")
    assert snoop.error_code == "state_access_denied"
    assert "secret" in snoop.error_message


def test_transient_failures_are_retried_then_bounded(workers):
    ok = run_submit(workflow="flaky_chain", input={"failures": 1}).run
    bad = run_submit(workflow="flaky_chain", input={"failures": 5}).run
    ok, bad = wait_for_run(ok.pk), wait_for_run(bad.pk)
    assert ok.status == "succeeded"
    flaky = Step.objects.get(run=ok, node="flaky")
    assert flaky.failures == 1 and flaky.output["text"] == "ok on attempt 2"
    assert bad.status == "failed" and bad.error_code == "max_attempts"
    assert len(Step.objects.get(run=bad, node="flaky").attempts_log) == 3


def test_worker_killed_mid_step_is_reclaimed_and_recorded_once(start_worker):
    doomed = start_worker("doomed", concurrency=1)
    run = run_submit(workflow="slow_then_echo", input={"seconds": 2.5, "text": "payload"}).run
    slow = wait_until(
        lambda: Step.objects.filter(run=run, node="slow", status="running").first(),
        what="slow step running",
    )
    owner_pid = int(slow.lease_owner.split(":")[1])
    assert owner_pid in doomed.pids()
    doomed.kill()
    start_worker("rescuer", concurrency=1)
    # The lease (3 s in tests) expires; the reaper puts the step back on the queue.
    wait_until(
        lambda: recovery.reap_expired_leases(), timeout=10, interval=0.2, what="lease to expire"
    )
    run = wait_for_run(run.pk)
    assert run.status == "succeeded", run.error_message
    slow.refresh_from_db()
    assert slow.attempt == 2
    assert AuditEvent.objects.filter(step_id=slow.pk, verb=Verb.STEP_SUCCEEDED).count() == 1
    assert StateVersion.objects.filter(run=run, key="text", step=slow).count() == 1
    assert run.state["echoed"] == "echo:payload done"


def test_paused_run_survives_restart_of_every_process(start_worker):
    first = [start_worker("a1"), start_worker("a2")]
    run = run_submit(workflow="reference_workload", input={"needs_approval": True}).run
    wait = open_wait(run)
    for worker in first:
        worker.kill()
    connection.close()  # the "web" process reconnects as after a restart
    start_worker("b1")
    start_worker("b2")
    assert Run.objects.get(pk=run.pk).status == "waiting"
    approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="after restart")
    run = wait_for_run(run.pk)
    assert run.status == "succeeded"
    assert Step.objects.get(run=run, node="publish").status == "succeeded"


def test_event_wait_times_out_into_its_declared_outcome(workers):
    cont = run_submit(workflow="event_timeout_continue", input={}).run
    fail = run_submit(workflow="event_timeout_fail", input={}).run
    open_wait(cont, "event")
    open_wait(fail, "event")
    time.sleep(1.1)
    assert recovery.expire_waits() == 2
    cont, fail = wait_for_run(cont.pk), wait_for_run(fail.pk)
    assert cont.status == "succeeded"
    assert cont.state["settlement"]["timed_out"] is True
    assert fail.status == "failed" and fail.error_code == "wait_timeout"


def test_approval_expiry_fails_closed(workers):
    run = run_submit(workflow="approval_expiry", input={}).run
    wait = open_wait(run)
    time.sleep(1.1)
    recovery.expire_waits()
    run = wait_for_run(run.pk)
    assert run.status == "failed" and run.error_code == "approval_expired"
    with pytest.raises(Conflict):
        approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="too late")


def test_two_concurrent_decisions_exactly_one_wins(workers):
    run = run_submit(workflow="reference_workload", input={"needs_approval": True}).run
    wait = open_wait(run)
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def decide(decision: str) -> None:
        barrier.wait()
        try:
            approval_decide(wait_id=wait.pk, user=None, decision=decision, reason="race")
            outcomes.append(f"won:{decision}")
        except Conflict as exc:
            outcomes.append(f"conflict:{exc.code}")
        finally:
            connection.close()

    threads = [threading.Thread(target=decide, args=(d,)) for d in ("approve", "reject")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["conflict", "won"]
    assert "conflict:already_decided" in outcomes
    run = wait_for_run(run.pk)
    assert run.status == ("succeeded" if "won:approve" in outcomes else "failed")


def test_parallel_waits_each_decision_reaches_its_own_wait(workers):
    run = run_submit(workflow="parallel_approvals", input={"text": "x"}).run
    left = open_wait(run, name="left")
    right = open_wait(run, name="right")
    assert (left.tier, right.tier) == (1, 2)
    approval_decide(wait_id=right.pk, user=None, decision="approve", reason="right only")
    wait_until(
        lambda: Step.objects.filter(run=run, node="right", status="succeeded").exists(),
        what="right ran",
    )
    left.refresh_from_db()
    assert left.status == "open"
    assert not Step.objects.filter(run=run, node="join").exists()
    approval_decide(wait_id=left.pk, user=None, decision="approve", reason="now left")
    run = wait_for_run(run.pk)
    assert run.status == "succeeded"
    assert run.state["joined"] == "echo:echo:echo:x+echo:echo:x"


def test_event_sent_twice_is_applied_once(workers):
    run = run_submit(workflow="event_timeout_continue", input={}).run
    open_wait(run, "event")
    first = run_send_event(
        run_id=run.pk, name="payment.settled", event_id="evt-1", payload={"ok": 1}, user=None
    )
    again = run_send_event(
        run_id=run.pk, name="payment.settled", event_id="evt-1", payload={"ok": 1}, user=None
    )
    assert first.applied and not first.duplicate
    assert again.duplicate and not again.applied and first.event.pk == again.event.pk
    run = wait_for_run(run.pk)
    assert run.status == "succeeded"
    assert StateVersion.objects.filter(run=run, key="settlement").count() == 1
    assert AuditEvent.objects.filter(run_id=run.pk, verb=Verb.EVENT_APPLIED).count() == 1


def test_duplicate_submit_with_the_same_key_returns_the_first_run(workers):
    first = run_submit(workflow="reference_workload", input={}, idempotency_key="order-42")
    second = run_submit(workflow="reference_workload", input={}, idempotency_key="order-42")
    assert first.created and not second.created
    assert first.run.pk == second.run.pk
    assert Run.objects.filter(idempotency_key="order-42").count() == 1
    wait_for_run(first.run.pk)


def test_every_state_change_left_its_event_row_in_the_same_transaction(workers):
    runs = [
        run_submit(workflow="reference_workload", input={}).run,
        run_submit(workflow="research_brief", input={}).run,
        run_submit(workflow="flaky_chain", input={"failures": 1}).run,
        run_submit(workflow="bad_handoff", input={}).run,
        run_submit(workflow="parallel_approvals", input={}).run,
    ]
    for wait in (open_wait(runs[4], name="left"), open_wait(runs[4], name="right")):
        approval_decide(wait_id=wait.pk, user=None, decision="approve", reason="ok")
    for run in runs:
        wait_for_run(run.pk)
    # PostgreSQL stamps every row version with the id of the transaction that wrote it (xmin):
    # the last write of every run, step, wait and state row must share it with an audit row.
    with connection.cursor() as cursor:
        for table in (
            "orchestration_run",
            "orchestration_step",
            "orchestration_wait",
            "orchestration_stateversion",
        ):
            cursor.execute(
                f"SELECT count(*), count(*) FILTER (WHERE NOT EXISTS ("
                f"  SELECT 1 FROM audit_auditevent a WHERE a.xmin = t.xmin)) FROM {table} t"
            )
            total, orphans = cursor.fetchone()
            assert total > 0, table
            assert orphans == 0, (
                f"{orphans} of {total} rows in {table} were changed without an audit event"
            )


def test_concurrent_fanouts_never_lose_or_reorder_an_item(workers):
    # Items of one map finish at the same moment on different workers; each completion is
    # checked against the run row's version, so a join never misses a sibling's output.
    runs = [run_submit(workflow="research_brief", input={}, seed=seed).run for seed in range(12)]
    for run in runs:
        run = wait_for_run(run.pk)
        assert run.status == "succeeded", run.error_message
        planned = run.state["subquestions"]
        assert [a["index"] for a in run.state["answers"]] == [p["index"] for p in planned]


def _ran_on(step: Step) -> str:
    """The worker that took ``step``: its claim, or its creation already claimed (local run)."""
    rows = AuditEvent.objects.filter(
        step_id=step.pk, verb__in=[Verb.STEP_CREATED, Verb.STEP_CLAIMED]
    ).order_by("id")
    return next(row.data["worker"] for row in rows if row.data.get("worker"))


def test_parallel_branches_run_at_the_same_time_on_two_workers(start_worker):
    # One process each, so a branch can only run in parallel on the other worker: the one that
    # finished "start" runs one branch itself and holds the other's message only briefly.
    start_worker("p1", concurrency=1)
    start_worker("p2", concurrency=1)
    began = time.monotonic()
    run = wait_for_run(
        run_submit(workflow="parallel_slow", input={"seconds": 1.5, "text": "x"}).run.pk
    )
    took = time.monotonic() - began
    assert run.status == "succeeded"
    s = steps(run)
    left, right = s["left"], s["right"]
    assert (
        left.started_at < right.finished_at and right.started_at < left.finished_at
    )  # they overlapped
    assert abs((left.started_at - right.started_at).total_seconds()) < 1.0
    assert _ran_on(left) != _ran_on(right)
    assert took < 3.0  # serially it would take at least 2 x 1.5 s
    assert left.output == right.output == {"text": "echo:x done"}
