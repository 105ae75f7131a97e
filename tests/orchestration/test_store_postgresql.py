"""The PostgreSQL store's fast paths (``orchestration/store/postgresql.py``): statements
prepared once per connection, rows sent as JSON, a transaction's writes as one batch. What lands
in the table must be what the ORM would have written, and a connection that lost its prepared
statements must carry on."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import DatabaseError, DataError, connection
from django.utils import timezone

from audit.models import AuditEvent
from audit.services import Entry, audit_record_many
from audit.verbs import ActorType, Verb
from infra.sql import Batch, insert, unsaved
from orchestration import advance, runtime
from orchestration.models import Run, Step, StepStatus
from orchestration.services import run_submit
from orchestration.store import LeaseLost
from orchestration.store.postgresql import PostgresStore, fence_step_checked, refusal
from policies.tenants import tenant_by_slug
from tests.conftest import ALL_POOLS
from tests.support.engine import runtime_for, step_claim, step_run

pytestmark = [pytest.mark.django_db(transaction=True)]

if connection.vendor != "postgresql":  # pragma: no cover - the suite runs on PostgreSQL
    pytest.skip("prepared batches are PostgreSQL-only", allow_module_level=True)


@pytest.fixture(autouse=True)
def _quiet(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


def _run() -> Run:
    return run_submit(workflow="reference_workload", input={"topic": "t"}).run


def _fields(obj: Any) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


def test_a_batched_step_row_is_what_the_orm_writes() -> None:
    run = _run()
    now = timezone.now()
    values: dict[str, Any] = {
        "run": run,
        "node": "ünïcode ✓ 'quoted' \\ back",
        "visit": 2,
        "item": 3,
        "kind": "item",
        "agent": "noop",
        "pool": "default",
        "status": StepStatus.QUEUED,
        "max_attempts": 5,
        "available_at": now,
        "published_at": None,
        "input": {"nested": [1, None, {"x": "y"}], "empty": {}},
        "input_override": None,
        "output": "a JSON string",
        "usage": {},
        "error_detail": None,
        "attempts_log": [],
        "created_at": now,
        "lease_expires_at": now + timedelta(seconds=30),
    }
    by_orm = Step.objects.create(**values)
    by_batch = Step(**{**values, "visit": 3})
    PostgresStore().assign_ids(Step, [by_batch])
    batch = Batch()
    insert(Step, [by_batch], batch=batch)
    batch.run()

    orm_row, batch_row = (
        _fields(Step.objects.get(pk=by_orm.pk)),
        _fields(Step.objects.get(pk=by_batch.pk)),
    )
    for row in (orm_row, batch_row):
        row.pop("id")
        row.pop("visit")
    assert batch_row == orm_row
    # SQL NULL for None in nullable JSON columns, as the ORM writes it (not JSON null).
    assert Step.objects.filter(
        pk=by_batch.pk, input_override__isnull=True, error_detail__isnull=True
    ).exists()


def test_batched_audit_rows_match_the_transactional_writer() -> None:
    run = _run()
    now = timezone.now()
    entries = [
        Entry(
            verb=Verb.STEP_SUCCEEDED,
            object_type="step",
            object_id=12,
            actor_type=ActorType.AGENT,
            actor_id="noop",
            run_id=run.pk,
            step_id=12,
            trace_id=run.trace_id,
            payload={"b": 1, "a": [2]},
            data={"key": "x", "attempt": 1},
        ),
        Entry(verb=Verb.RUN_SUCCEEDED, object_type="run", object_id=run.pk, run_id=run.pk),
    ]
    batch = Batch()
    audit_record_many(entries, now=now, batch=batch)
    batch.run()
    from django.db import transaction

    with transaction.atomic():
        audit_record_many(entries, now=now)

    rows = [
        _fields(e)
        for e in AuditEvent.objects.filter(
            run_id=run.pk, verb__in=[e.verb for e in entries]
        ).order_by("id")
    ]
    for row in rows:
        row.pop("id")
    assert rows[:2] == rows[2:]
    assert rows[0]["created_at"] == now and rows[0]["object_id"] == "12"


def test_naive_datetimes_are_taken_in_the_default_zone_as_the_orm_does() -> None:
    run = _run()
    naive = datetime(2026, 1, 2, 3, 4, 5, 678901)
    step = Step(
        run=run,
        node="n",
        kind="agent",
        status=StepStatus.QUEUED,
        available_at=naive,
        created_at=naive,
    )
    PostgresStore().assign_ids(Step, [step])
    batch = Batch()
    with pytest.warns(RuntimeWarning, match="naive datetime"):
        insert(Step, [step], batch=batch)
    batch.run()
    assert Step.objects.get(pk=step.pk).available_at == naive.replace(tzinfo=UTC)


def test_a_connection_that_lost_its_prepared_statements_carries_on(drive: Any) -> None:
    first = _run()
    assert drive(first.pk).status == "succeeded"  # claims and completions prepared their statements

    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    second = _run()
    assert drive(second.pk).status == "succeeded"
    # Every step succeeded at its first attempt: no commit failed for want of a statement.
    assert set(Step.objects.filter(run=second).values_list("status", "attempt", "failures")) == {
        ("succeeded", 1, 0)
    }


def test_a_claim_is_one_prepared_statement_that_still_claims_once() -> None:
    run = _run()
    step_id = Step.objects.get(run=run, node="classify").pk
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    claimed = step_claim(step_id, "w1")
    assert claimed is not None and claimed.attempt == 1 and claimed.run.status == "running"
    assert step_claim(step_id, "w2") is None


def test_a_batched_submit_is_all_or_nothing() -> None:
    from django.db import IntegrityError

    first = run_submit(workflow="reference_workload", input={}, idempotency_key="k-1")
    assert first.created
    # The same key again, past the lookup (as when two submits race): the unique constraint
    # refuses the run row and nothing of the batch is left behind.
    now = timezone.now()
    copy = Run(
        workflow_name="reference_workload",
        workflow_version=1,
        idempotency_scope="system",
        idempotency_key="k-1",
        trace_id="t",
        input={},
        created_at=now,
        updated_at=now,
        deadline_at=now,
        tenant=tenant_by_slug(""),
    )
    store = runtime.current().store
    changes = advance.run_started(
        store.new_run_snapshot(copy),
        now,
        state={},
        input={},
        idempotency_key="k-1",
        actor_type="system",
        actor_id="",
    )
    with pytest.raises(IntegrityError):
        store.commit(changes).result()
    assert copy.pk is not None
    assert not Step.objects.filter(run_id=copy.pk).exists()
    assert not AuditEvent.objects.filter(run_id=copy.pk).exists()
    again = run_submit(workflow="reference_workload", input={}, idempotency_key="k-1")
    assert not again.created and again.run.pk == first.run.pk


def test_a_batched_submit_with_a_key_seen_before_returns_the_first_run_and_writes_nothing() -> None:
    first = run_submit(workflow="reference_workload", input={"topic": "a"}, idempotency_key="again")
    counts = (Run.objects.count(), Step.objects.count(), AuditEvent.objects.count())
    second = run_submit(
        workflow="reference_workload", input={"topic": "a"}, idempotency_key="again"
    )
    assert first.created and not second.created
    assert second.run.pk == first.run.pk and second.run.input == {"topic": "a"}
    assert (Run.objects.count(), Step.objects.count(), AuditEvent.objects.count()) == counts


def test_a_submit_that_fails_at_its_start_still_commits_the_failed_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A start that raises goes the transactional way (failing a run cancels its steps, which a
    # batch cannot do), and is recorded.
    from orchestration.errors import SignalboxError

    def broken(self: Any) -> None:
        raise SignalboxError("no start", code="start_broken")

    monkeypatch.setattr("orchestration.advance.RunAdvance.start", broken)
    run = run_submit(workflow="reference_workload", input={}).run
    run.refresh_from_db()
    assert (run.status, run.error_code) == ("failed", "start_broken")
    verbs = set(AuditEvent.objects.filter(run_id=run.pk).values_list("verb", flat=True))
    assert {int(Verb.RUN_SUBMITTED), int(Verb.RUN_FAILED)} <= verbs


def test_who_ran_each_step_is_in_the_audit_trail(drive: Any) -> None:
    run = _run()
    assert drive(run.pk).status == "succeeded"
    steps = {s.node: s.pk for s in Step.objects.filter(run=run)}
    rows = list(
        AuditEvent.objects.filter(
            run_id=run.pk, verb__in=[Verb.STEP_CREATED, Verb.STEP_CLAIMED]
        ).values_list("step_id", "verb", "data")
    )
    # classify was queued at submit and claimed from its message: created, then claimed.
    assert [(v, d.get("worker")) for s, v, d in rows if s == steps["classify"]] == [
        (Verb.STEP_CREATED, None),
        (Verb.STEP_CLAIMED, "t"),
    ]
    # research_a was created already claimed by the worker that finished classify: one row
    # says both, with the worker and the attempt.
    local = [(v, d) for s, v, d in rows if s == steps["research_a"]]
    assert len(local) == 1
    verb, data = local[0]
    assert verb == Verb.STEP_CREATED
    assert (data["status"], data["worker"], data["attempt"]) == ("running", "t", 1)


def test_a_sibling_the_worker_claims_itself_in_time_costs_no_broker_message(
    drive: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "HANDOFF_HOLD_SECONDS": 0.2}
    published: list[int] = []
    monkeypatch.setattr(
        "orchestration.dispatch.publish",
        lambda steps, rt, **_: published.extend(s for s, _, _ in steps),
    )
    run = _run()
    assert drive(run.pk).status == "succeeded"
    # classify's worker ran research_a itself and held research_b's message; its chain then
    # claimed research_b before the hold ended, so no message is ever sent for it.
    assert runtime_for(ALL_POOLS).held.held() == set()
    time.sleep(0.3)  # past the hold: nothing left to go out
    # The only wake-up message of the run was the first step's, sent by the submit.
    assert published == [Step.objects.get(run=run, node="classify").pk]


def _transactions(run: Run) -> dict[tuple[int, int], str]:
    """(step id, verb) -> the transaction that wrote that audit row (its xmin)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT step_id, verb, xmin::text FROM audit_auditevent WHERE run_id = %s AND verb IN (%s, %s)",
            [run.pk, int(Verb.STEP_SUCCEEDED), int(Verb.STEP_CLAIMED)],
        )
        return {(step_id, verb): x for step_id, verb, x in cursor.fetchall()}


def test_a_chain_that_ends_claims_its_handed_off_sibling_in_the_same_transaction(
    drive: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(
        "orchestration.live.LiveSender.send", lambda self, events: sent.append(list(events))
    )
    run = run_submit(workflow="siblings", input={"text": "t"}).run  # agents that are not pure
    assert drive(run.pk).status == "succeeded"
    steps = {s.node: s.pk for s in Step.objects.filter(run=run)}
    xmin = _transactions(run)
    # a's completion (the join still waits for b) also claimed b; b then ran and committed alone.
    assert xmin[(steps["b"], Verb.STEP_CLAIMED)] == xmin[(steps["a"], Verb.STEP_SUCCEEDED)]
    assert xmin[(steps["b"], Verb.STEP_SUCCEEDED)] != xmin[(steps["a"], Verb.STEP_SUCCEEDED)]
    # ...and operators heard of both in one message for that transaction.
    together = [
        e
        for e in sent
        if {(x.get("step_id"), x.get("change")) for x in e}
        >= {(steps["a"], "succeeded"), (steps["b"], "running")}
    ]
    assert len(together) == 1


def test_pure_siblings_run_back_to_back_and_commit_in_one_transaction(
    drive: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[list[dict[str, Any]]] = []
    monkeypatch.setattr(
        "orchestration.live.LiveSender.send", lambda self, events: sent.append(list(events))
    )
    run = _run()  # the reference workload: every agent is pure
    assert drive(run.pk).status == "succeeded"
    steps = {s.node: s for s in Step.objects.filter(run=run)}
    xmin = _transactions(run)
    a, b = steps["research_a"].pk, steps["research_b"].pk
    # research_b ran before research_a's completion was sent, and joined its transaction: its
    # claim (by this worker, attempt 1) and its success are written with research_a's.
    assert (
        xmin[(b, Verb.STEP_CLAIMED)]
        == xmin[(b, Verb.STEP_SUCCEEDED)]
        == xmin[(a, Verb.STEP_SUCCEEDED)]
    )
    claim = AuditEvent.objects.get(step_id=b, verb=Verb.STEP_CLAIMED)
    assert (claim.actor_id, claim.data) == ("t", {"attempt": 1, "worker": "t"})
    assert (steps["research_b"].status, steps["research_b"].attempt) == ("succeeded", 1)
    assert steps["research_b"].started_at is not None and steps["research_b"].lease_owner == ""
    # One message for that transaction tells of both.
    assert (
        len(
            [
                e
                for e in sent
                if {(x.get("step_id"), x.get("change")) for x in e}
                >= {(a, "succeeded"), (b, "succeeded")}
            ]
        )
        == 1
    )
    # submit, classify's claim, classify, the two research steps, draft, publish.
    assert (
        len({x for x in AuditEvent.objects.filter(run_id=run.pk).values_list("run_id", flat=True)})
        == 1
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(DISTINCT xmin::text) FROM audit_auditevent WHERE run_id = %s", [run.pk]
        )
        assert cursor.fetchone()[0] == 6


def test_a_worker_whose_claim_was_lost_cannot_commit_over_a_new_claim_with_the_same_token() -> None:
    run = _run()
    classify = Step.objects.get(run=run, node="classify")
    first = step_claim(classify.pk, "w1")
    assert first is not None and first.attempt == 1
    # A database crash lost w1's claim (claims do not wait for their WAL flush), and w2 claimed
    # the step again: the same token, another owner.
    Step.objects.filter(pk=classify.pk).update(
        status="queued", attempt=0, lease_owner="", lease_expires_at=None
    )
    second = step_claim(classify.pk, "w2")
    assert second is not None and second.attempt == 1

    assert step_run(first, worker_id="w1", pools=frozenset()) is None
    classify.refresh_from_db()
    assert (classify.status, classify.lease_owner, classify.output) == ("running", "w2", None)

    step_run(second, worker_id="w2", pools=frozenset())
    classify.refresh_from_db()
    assert classify.status == "succeeded"
    assert AuditEvent.objects.filter(step_id=classify.pk, verb=Verb.STEP_SUCCEEDED).count() == 1


def test_only_the_claim_itself_skips_waiting_for_the_wal_flush() -> None:
    run = _run()
    classify = Step.objects.get(run=run, node="classify")
    assert step_claim(classify.pk, "w1") is not None
    # SET LOCAL ended with the claim's transaction: what this connection commits next (a
    # completion) waits for the disk again.
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


TRICKY = [
    "plain",
    "it's",
    "''",
    "back\\slash",
    "\\'",
    "E'x'",
    "$$ dollar $$",
    "-- comment",
    "/* c */",
    "'); DROP TABLE orchestration_step; --",
    "ünïcode ✓ 🚀",
    "new\nline\ttab",
    "%s %(x)s %%",
    "",
]


def _echo_statement() -> Any:
    from infra.sql import Prepared

    return Prepared(
        "SELECT $1::text, $2::bigint, $3::timestamptz, $4::boolean, $5::text, $6::numeric",
        [
            "text",
            "bigint",
            "timestamptz",
            "boolean",
            "text",
            "numeric",
        ],
    )


@pytest.mark.parametrize("conforming", ["on", "off"])
def test_parameters_of_a_batch_arrive_exactly_as_given(conforming: str) -> None:
    from decimal import Decimal

    from orchestration.models import StepStatus as Status

    statement = _echo_statement()
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(f"SET standard_conforming_strings = {conforming}")
    try:
        for text in TRICKY:
            batch = Batch()
            # A str subclass (a model choice) and a Decimal are rendered by psycopg instead.
            batch.add_prepared(
                statement, [text, -(2**62), now, False, Status.RUNNING, Decimal("1.25")]
            )
            assert batch.run() == [(text, -(2**62), now, False, "running", Decimal("1.25"))]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET standard_conforming_strings")


def test_batch_literals_quote_strings_and_leave_other_types_to_psycopg() -> None:
    from infra.sql import literal

    assert literal("it's") == "'it''s'"
    assert (
        literal("back\\slash") == "'back\\slash'"
    )  # an ordinary character with conforming strings
    assert (literal(7), literal(None), literal(True)) == ("7", "NULL", "true")
    assert literal(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "'2026-01-02T03:04:05+00:00'"
    assert literal(datetime(2026, 1, 2)) is None  # naive: psycopg's rules apply
    assert literal(StepStatus.RUNNING) is None  # a str subclass
    assert literal("nul\x00byte") is None  # PostgreSQL text cannot hold it: psycopg refuses it


def test_a_string_with_a_nul_byte_is_refused_and_nothing_is_written() -> None:
    from infra.sql import Prepared

    run = _run()
    statement = Prepared(
        "UPDATE orchestration_run SET error_message = $1 WHERE id = $2", ["text", "bigint"]
    )
    batch = Batch()
    batch.add_prepared(statement, ["fine", run.pk])
    batch.add_prepared(statement, ["nul\x00byte", run.pk])
    with pytest.raises(DataError, match="NUL"):
        batch.run()
    assert Run.objects.get(pk=run.pk).error_message == ""


# --- batches in flight (Batch.send) ------------------------------------------------------------


def _mark(step_id: int, text: str) -> Batch:
    batch = Batch()
    batch.add("UPDATE orchestration_step SET error_message = %s WHERE id = %s", [text, step_id])
    return batch


def test_a_batch_in_flight_is_read_before_the_connection_carries_anything_else() -> None:
    from django.db import transaction

    run = _run()
    step_id = Step.objects.get(run=run, node="classify").pk
    handle = _mark(step_id, "sent ahead").send()
    # The ORM uses the connection at once: the batch's outcome is read first, its write is in.
    assert Step.objects.get(pk=step_id).error_message == "sent ahead"
    assert handle.result() is None
    _mark(step_id, "sent again").send()
    with transaction.atomic():  # a transaction's BEGIN also waits for the batch
        assert Step.objects.select_for_update().get(pk=step_id).error_message == "sent again"


def test_a_batch_in_flight_that_fails_raises_when_asked_and_wrote_nothing() -> None:
    run = _run()
    step_id = Step.objects.get(run=run, node="classify").pk
    batch = _mark(step_id, "must not stay")
    # A fence on a step that is not running: the batch aborts (SBX01) as a whole.
    fence_step_checked(batch, step_id, 1, "w1", {"status": StepStatus.SUCCEEDED})
    handle = batch.send()
    assert Step.objects.get(pk=step_id).error_message == ""
    with pytest.raises(DatabaseError) as failure:
        handle.result()
    assert isinstance(refusal(failure.value), LeaseLost)


def test_a_batch_sent_after_its_statements_were_forgotten_is_prepared_again_and_runs() -> None:
    run = _run()
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    batch = Batch()
    audit_record_many(
        [
            Entry(
                verb=Verb.RUN_SUBMITTED,
                object_type="run",
                object_id=run.pk,
                run_id=run.pk,
                actor_type=ActorType.SYSTEM,
            )
        ],
        batch=batch,
    )
    before = AuditEvent.objects.filter(run_id=run.pk).count()
    batch.send().result()
    assert AuditEvent.objects.filter(run_id=run.pk).count() == before + 1


def test_a_batched_insert_takes_the_id_of_a_related_row_saved_after_assignment_and_refuses_an_unsaved_one() -> (
    None
):
    from orchestration.models import StateVersion

    run = _run()
    now = timezone.now()
    later = Run(
        workflow_name="reference_workload",
        workflow_version=1,
        trace_id="t",
        input={},
        created_at=now,
        updated_at=now,
        deadline_at=now,
        tenant=tenant_by_slug(""),
    )
    version = unsaved(
        StateVersion, run=later, key="k", version=1, value={"v": 1}, writer="test", created_at=now
    )
    assert version.run_id is None
    with pytest.raises(ValueError, match="unsaved related object"):
        insert(StateVersion, [version], returning=False, batch=Batch())
    later.save()
    batch = Batch()
    insert(StateVersion, [version], returning=False, batch=batch)
    batch.run()
    assert StateVersion.objects.get(run=later, key="k").value == {"v": 1}
    assert run.pk != later.pk
