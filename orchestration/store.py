"""Hot-path persistence: the few statements a step costs, in as few round trips as possible.

The engine's logic (``engine.Tx``) decides what to write; this module writes it. On PostgreSQL
the statements of one phase go out together in a psycopg pipeline (one network round trip), new
step ids come from blocks reserved on the table's own sequence (so inserts need no RETURNING),
and a claim is one statement. On SQLite (embedded mode) the same statements run one by one.
Conversion of values goes through each model field's ``get_db_prep_save``, as the ORM does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any, TypeVar, cast

from django.db import models
from django.db.models.base import ModelState

from audit.models import AuditEvent
from audit.verbs import ActorType, Verb
from infra.sql import (
    Batch,
    Prepared,
    db,
    dumps,
    execute_prepared,
    from_row,
    is_postgres,
    json_columns,
    pipeline,
)
from orchestration.models import Run, RunStatus, Step, StepStatus

ID_BLOCK = 200

M = TypeVar("M", bound=models.Model)


# --- ids --------------------------------------------------------------------------------------


class _IdBlocks:
    """Ids reserved in blocks from a table's identity sequence, per process (PostgreSQL)."""

    def __init__(self) -> None:
        self._free: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def take(self, model: type[models.Model], count: int) -> list[int]:
        table = model._meta.db_table
        with self._lock:
            free = self._free.setdefault(table, [])
            if len(free) < count:
                with db().cursor() as cursor:
                    cursor.execute(
                        "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                        [table, max(ID_BLOCK, count)],
                    )
                    free.extend(row[0] for row in cursor.fetchall())
            taken, self._free[table] = free[:count], free[count:]
            return taken

    def forget(self) -> None:
        with self._lock:
            self._free.clear()


id_blocks = _IdBlocks()
# A forked child must not hand out ids its parent also holds.
os.register_at_fork(after_in_child=id_blocks.forget)


def assign_ids(model: type[models.Model], objs: Sequence[models.Model]) -> None:
    """Give unsaved objects their primary keys before insert (PostgreSQL)."""
    missing = [o for o in objs if o.pk is None]
    if missing and is_postgres():
        for obj, pk in zip(missing, id_blocks.take(model, len(missing)), strict=True):
            obj.pk = pk


@cache
def _step_columns() -> str:
    return ", ".join(f"s.{db().ops.quote_name(f.column)}" for f in Step._meta.concrete_fields)


@cache
def _run_columns(alias: str) -> str:
    return ", ".join(f"{alias}.{db().ops.quote_name(f.column)}" for f in Run._meta.concrete_fields)


def unsaved(model: type[M], **values: Any) -> M:
    """A new, unsaved instance of ``model`` with ``values`` and every other field's default, as
    ``model(**values)`` makes it, without that constructor's keyword handling (~30 µs a step on
    this hot path). A related object may be given by its field name, like the constructor's."""
    defaults, relations = _instance_spec(model)
    obj = model.__new__(model)
    obj._state = ModelState()
    attrs = {attname: default() if call else default for attname, default, call in defaults}
    for name, value in values.items():
        attname = relations.get(name)
        if attname is None:
            attrs[name] = value
        else:  # the related object: its id, and the object itself cached as the constructor does
            attrs[attname] = None if value is None else value.pk
            obj._state.fields_cache[name] = value
    obj.__dict__.update(attrs)
    return obj


@cache
def _instance_spec(model: type[models.Model]) -> tuple[list[tuple[str, Any, bool]], dict[str, str]]:
    defaults = []
    for field in model._meta.concrete_fields:
        if field.has_default() and callable(field.default):
            defaults.append((field.attname, field.default, True))
        else:
            defaults.append((field.attname, field.get_default(), False))
    relations = {f.name: f.attname for f in model._meta.concrete_fields if f.is_relation}
    return defaults, relations


def lock_run_and_fence_step(
    run_id: int, step_id: int, token: int, owner: str, values: dict[str, Any]
) -> Run | None:
    """Lock the run row and move the step from ``running`` (with this token and owner) to ``values``.

    Both statements go in one round trip. ``None`` when the fence fails: the lease was lost."""
    conn = db()
    fields = [cast("models.Field[Any, Any]", Step._meta.get_field(name)) for name in values]
    assignments = ", ".join(f"{db().ops.quote_name(f.column)} = %s" for f in fields)
    params = [f.get_db_prep_save(values[f.name], conn) for f in fields]
    lock = " FOR UPDATE" if is_postgres() else ""
    with db().cursor() as run_cursor, db().cursor() as step_cursor, pipeline():
        run_cursor.execute(f"SELECT {_run_columns('r')} FROM {Run._meta.db_table} r WHERE r.id = %s{lock}", [run_id])
        step_cursor.execute(
            f"UPDATE {Step._meta.db_table} SET {assignments} "
            "WHERE id = %s AND status = %s AND attempt = %s AND lease_owner = %s RETURNING id",
            [*params, step_id, StepStatus.RUNNING, token, owner],
        )
        run_row = run_cursor.fetchone()
        fenced = step_cursor.fetchone()
    if not fenced or run_row is None:
        return None
    return from_row(Run, run_row)


def claim_step(step_id: int, worker_id: str, now: datetime, lease_until: datetime) -> Step | None:
    """Claim a queued, due step: one statement on PostgreSQL (claim, first-claim run start and
    their audit rows together). Returns the step with its run attached, or ``None``."""
    if is_postgres():
        return _claim_postgres(step_id, worker_id, now, lease_until)
    return _claim_generic(step_id, worker_id, now, lease_until)


@cache
def _claim_statement() -> Prepared:
    step_t, run_t, audit_t = Step._meta.db_table, Run._meta.db_table, AuditEvent._meta.db_table
    audit_cols = "created_at, actor_type, actor_id, verb, object_type, object_id, run_id, step_id, trace_id, payload_digest, data"
    # $1 step id, $2 worker, $3 lease expiry, $4 now; the constants are part of the statement.
    running, queued, run_queued = (f"'{v}'" for v in (StepStatus.RUNNING, StepStatus.QUEUED, RunStatus.QUEUED))
    system = f"'{ActorType.SYSTEM}'"
    sql = f"""
    WITH c AS (
        UPDATE {step_t} s SET status = {running}, attempt = s.attempt + 1, lease_owner = $2,
               lease_expires_at = $3, started_at = COALESCE(s.started_at, $4)
        WHERE s.id = $1 AND s.status = {queued} AND s.available_at <= $4
        RETURNING {_step_columns()}
    ), started AS (
        UPDATE {run_t} r SET status = {running}, started_at = $4, updated_at = $4,
               version = r.version + 1
        WHERE r.id = (SELECT run_id FROM c) AND r.status = {run_queued}
        RETURNING r.id, r.trace_id
    ), audit AS (
        INSERT INTO {audit_t} ({audit_cols})
        SELECT $4, {system}, $2, {int(Verb.STEP_CLAIMED)}, 'step', c.id::text, c.run_id, c.id, r.trace_id, '',
               jsonb_build_object('attempt', c.attempt, 'worker', $2)
        FROM c JOIN {run_t} r ON r.id = c.run_id
        UNION ALL
        SELECT $4, {system}, $2, {int(Verb.RUN_STARTED)}, 'run', started.id::text, started.id, NULL,
               started.trace_id, '', '{{}}'::jsonb
        FROM started
    )
    SELECT {_step_columns()}, {_run_columns('r')}, (SELECT count(*) FROM started)
    FROM c s JOIN {run_t} r ON r.id = s.run_id
    """
    return Prepared(sql, ["bigint", "text", "timestamptz", "timestamptz"])


def claim_in_batch(batch: Batch, step_id: int, worker_id: str, now: datetime, lease_until: datetime) -> None:
    """Make the claim of ``step_id`` the last statement of ``batch`` (same transaction): the
    batch's rows are then the claim's, for :func:`claimed_from_row`."""
    batch.add_prepared(_claim_statement(), [step_id, worker_id, lease_until, now])


def _claim_postgres(step_id: int, worker_id: str, now: datetime, lease_until: datetime) -> Step | None:
    # A prepared statement: the server plans this CTE once per connection, not per claim.
    if db().in_atomic_block:  # a caller's transaction: it commits as the caller says
        row = execute_prepared(_claim_statement(), [step_id, worker_id, lease_until, now])
        return claimed_from_row(row, now)
    # A claim is committed without waiting for its WAL to reach the disk. Losing it in a
    # database crash (the last ~200 ms of such commits, wal_writer_delay) is the same as a worker
    # that died right after claiming: the step is queued again, the reaper sends its message
    # again, and it runs again, with the same tool-call idempotency keys. Nothing durable can
    # depend on a lost claim: the WAL is a sequence, so a later synchronous commit (the step's
    # completion, any other transaction) makes every earlier claim durable with it. The
    # completion's fence checks the lease owner as well as the token, so a worker whose claim
    # was lost cannot commit over another worker's new claim with the same token.
    batch = Batch()
    batch.add("SET LOCAL synchronous_commit TO off", [])
    claim_in_batch(batch, step_id, worker_id, now, lease_until)
    rows = batch.run()
    return claimed_from_row(rows[0] if rows else None, now)


def claimed_from_row(row: Any, now: datetime) -> Step | None:
    """The claimed step (with its run) from the claim statement's row; ``None`` for no row."""
    if row is None:
        return None
    n_step = len(Step._meta.concrete_fields)
    step = from_row(Step, row[:n_step])
    run = from_row(Run, row[n_step:-1])
    if row[-1]:  # this claim started the run (the row above is from before that update)
        run.status, run.started_at, run.version = RunStatus.RUNNING, now, run.version + 1
    step.run = run
    return step


def _claim_generic(step_id: int, worker_id: str, now: datetime, lease_until: datetime) -> Step | None:
    from django.db.models import F
    from django.db.models.functions import Coalesce

    from audit.services import Entry, audit_record_many

    claimed = Step.objects.filter(pk=step_id, status=StepStatus.QUEUED, available_at__lte=now).update(
        status=StepStatus.RUNNING, attempt=F("attempt") + 1, lease_owner=worker_id,
        lease_expires_at=lease_until, started_at=Coalesce(F("started_at"), now),
    )
    if not claimed:
        return None
    step = Step.objects.select_related("run").get(pk=step_id)
    run = step.run
    entries = [Entry(verb=Verb.STEP_CLAIMED, object_type="step", object_id=step.pk, actor_id=worker_id,
                     run_id=run.pk, step_id=step.pk, trace_id=run.trace_id,
                     data={"attempt": step.attempt, "worker": worker_id})]
    if run.status == RunStatus.QUEUED and Run.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.RUNNING, started_at=now, updated_at=now, version=F("version") + 1
    ):
        run.status, run.started_at, run.version = RunStatus.RUNNING, now, run.version + 1
        entries.append(Entry(verb=Verb.RUN_STARTED, object_type="run", object_id=run.pk, actor_id=worker_id,
                             run_id=run.pk, trace_id=run.trace_id))
    audit_record_many(entries, now=now)
    return step



# --- optimistic completion (PostgreSQL) ---------------------------------------------------------

#: SQLSTATEs raised by ``signalbox_expect`` (migration 0003): the transaction is rolled back.
LEASE_LOST = "SBX01"
RUN_CHANGED = "SBX02"
#: A queued step this worker ran before claiming it was taken by another worker meanwhile.
STEP_TAKEN = "SBX03"


def expectation_failed(exc: BaseException) -> str | None:
    """The SQLSTATE of a failed ``signalbox_expect`` behind ``exc`` (a deadlock counts as a
    changed run: retrying with fresh data is the answer to both), else ``None``."""
    seen: BaseException | None = exc
    while seen is not None:
        state = getattr(seen, "sqlstate", None)
        if state in (LEASE_LOST, RUN_CHANGED, STEP_TAKEN):
            return state
        if state == "40P01":
            return RUN_CHANGED
        seen = seen.__cause__ or seen.__context__
    return None


def update_run_checked(run: Run, fields: Sequence[str], expected_version: int, *, batch: Batch | None = None) -> None:
    """UPDATE the run row only if nobody wrote it since ``expected_version`` was read; otherwise
    abort the transaction with RUN_CHANGED. Queued without waiting for a result."""
    if batch is not None:
        statement, columns = _checked_update(Run, tuple(fields), "t.version = $3", RUN_CHANGED)
        row = {column: convert(getattr(run, attname)) for column, attname, convert in columns}
        batch.add_prepared(statement, [dumps(row), run.pk, expected_version])
        return
    conn = db()
    chosen = [cast("models.Field[Any, Any]", Run._meta.get_field(name)) for name in fields]
    assignments = ", ".join(f"{db().ops.quote_name(f.column)} = %s" for f in chosen)
    params = [f.get_db_prep_save(getattr(run, f.attname), conn) for f in chosen]
    sql = (
        f"WITH u AS (UPDATE {Run._meta.db_table} SET {assignments} WHERE id = %s AND version = %s RETURNING 1) "
        f"SELECT signalbox_expect(count(*) = 1, '{RUN_CHANGED}') FROM u"
    )
    _execute(sql, [*params, run.pk, expected_version], batch)


def fence_step_checked(
    step_id: int, token: int, owner: str, values: dict[str, Any], *, batch: Batch | None = None
) -> None:
    """Move a running step, claimed with ``token`` by ``owner``, to ``values``; otherwise abort
    with LEASE_LOST. The owner counts too: a claim that was lost in a database crash (claims
    are committed without waiting for their WAL flush) can be made again with the same token."""
    if batch is not None:
        statement, columns = _checked_update(
            Step, tuple(values), f"t.status = '{StepStatus.RUNNING}' AND t.attempt = $3 AND t.lease_owner = $4",
            LEASE_LOST, ("text",),
        )
        row = {column: convert(values[name]) for (column, _, convert), name in zip(columns, values, strict=True)}
        batch.add_prepared(statement, [dumps(row), step_id, token, owner])
        return
    conn = db()
    fields = [cast("models.Field[Any, Any]", Step._meta.get_field(name)) for name in values]
    assignments = ", ".join(f"{db().ops.quote_name(f.column)} = %s" for f in fields)
    params = [f.get_db_prep_save(values[f.name], conn) for f in fields]
    sql = (
        f"WITH u AS (UPDATE {Step._meta.db_table} SET {assignments} "
        f"WHERE id = %s AND status = %s AND attempt = %s AND lease_owner = %s RETURNING 1) "
        f"SELECT signalbox_expect(count(*) = 1, '{LEASE_LOST}') FROM u"
    )
    _execute(sql, [*params, step_id, StepStatus.RUNNING, token, owner], batch)


def claim_completed_checked(
    step_id: int, attempt_before: int, values: dict[str, Any], now: datetime, *, batch: Batch
) -> None:
    """Move a queued step straight to ``values``, its claim and its outcome at once, if it is
    still queued at ``attempt_before`` and due; otherwise abort with STEP_TAKEN. For a pure step
    a worker ran before claiming it, committed in its sibling's transaction."""
    statement, columns = _checked_update(
        Step, tuple(values), f"t.status = '{StepStatus.QUEUED}' AND t.attempt = $3 AND t.available_at <= $4",
        STEP_TAKEN, ("timestamptz",),
    )
    row = {column: convert(values[name]) for (column, _, convert), name in zip(columns, values, strict=True)}
    batch.add_prepared(statement, [dumps(row), step_id, attempt_before, now])


@cache
def _checked_update(
    model: type[models.Model], fields: tuple[str, ...], condition: str, code: str, extra: tuple[str, ...] = ()
) -> tuple[Prepared, list[tuple[str, str, Any]]]:
    """A prepared UPDATE of one row's ``fields`` (from a JSON row, $1) by id ($2) under
    ``condition`` (which may use $3, a bigint, and parameters of the ``extra`` types after it),
    aborting with ``code`` unless exactly one row matched."""
    columns = json_columns(model, fields)
    qn = db().ops.quote_name
    table = qn(model._meta.db_table)
    assignments = ", ".join(f"{qn(column)} = x.{qn(column)}" for column, _, _ in columns)
    sql = (
        f"WITH u AS (UPDATE {table} t SET {assignments} FROM jsonb_populate_record(NULL::{table}, $1) x "
        f"WHERE t.id = $2 AND {condition} RETURNING 1) "
        f"SELECT signalbox_expect(count(*) = 1, '{code}') FROM u"
    )
    return Prepared(sql, ["jsonb", "bigint", "bigint", *extra]), columns


def _execute(sql: str, params: Sequence[Any], batch: Batch | None) -> None:
    if batch is not None:
        batch.add(sql, params)
        return
    with db().cursor() as cursor:
        cursor.execute(sql, params)


def run_fetch(run_id: int) -> Run:
    return Run.objects.get(pk=run_id)
