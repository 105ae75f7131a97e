"""The PostgreSQL store: the plain store's interface with the engine's measured fast paths.

* A claim is one prepared statement: the conditional UPDATE of the step, the run's start and
  their audit rows (the audit app's INSERT), committed without waiting for its WAL flush.
* New rows get their ids from blocks reserved on each table's identity sequence, so a batch
  needs no ``RETURNING`` and a whole transaction needs no answer back.
* A transaction's writes go as ONE multi-statement string of prepared statements, rows as JSON
  documents (``WriteBatch``): one round trip, in autocommit, all or nothing. A completion checks
  the run row's version and the step's fence inside that string (``signalbox_expect``, which
  aborts it with a SQLSTATE of ours) instead of locking first, and may be sent without waiting
  for its answer (``WriteBatch.send``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any, cast

from django.db import DatabaseError, models

from audit.services import audit_insert_from, audit_record_many
from audit.verbs import ActorType, Verb
from infra.sql import (
    BY_KEY,
    Batch,
    InFlight,
    Prepared,
    db,
    dumps,
    execute_prepared,
    from_row,
    insert,
    json_columns,
    update,
)
from orchestration.changes import Changes
from orchestration.models import (
    Run,
    RunEvent,
    RunStatus,
    StateVersion,
    Step,
    StepStatus,
    ToolCall,
    Wait,
    WaitStatus,
)
from orchestration.store.plain import (
    RUN_FIELDS,
    LeaseLost,
    Pending,
    RunChanged,
    StepTaken,
    Store,
    WriteBatch,
)
from policies.ledger import (
    Held,
    HoldRequest,
    Settlement,
    hold_answer,
    hold_scope_ids,
    hold_statements,
    settle_hold_prepared,
    settlement_prepared,
    settlements_prepared,
)
from policies.models import PolicyDecision

ID_BLOCK = 200

#: SQLSTATEs raised by ``signalbox_expect`` (migration 0003): the transaction is rolled back.
LEASE_LOST = "SBX01"
RUN_CHANGED = "SBX02"
STEP_TAKEN = "SBX03"


def refusal(exc: BaseException) -> LeaseLost | RunChanged | StepTaken | None:
    """The refused guard behind a database error (a deadlock counts as a changed run: reading
    again and recomputing is the answer to both), else ``None``."""
    seen: BaseException | None = exc
    while seen is not None:
        state = getattr(seen, "sqlstate", None)
        if state == LEASE_LOST:
            return LeaseLost(str(exc))
        if state in (RUN_CHANGED, "40P01"):
            return RunChanged(str(exc))
        if state == STEP_TAKEN:
            return StepTaken(str(exc))
        seen = seen.__cause__ or seen.__context__
    return None


class IdBlocks:
    """Ids reserved in blocks from a table's identity sequence, for one process."""

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


class PostgresStore(Store):
    optimistic = True

    def __init__(self) -> None:
        self.ids = IdBlocks()

    @property
    def pipelined(self) -> bool:  # type: ignore[override]  # a property where the plain store has a constant
        return bool(getattr(db(), "supports_batches_in_flight", False))

    # --- ids ----------------------------------------------------------------------------------

    def assign_ids(self, model: type[models.Model], objs: Sequence[models.Model]) -> None:
        missing = [o for o in objs if o.pk is None]
        if missing:
            for obj, pk in zip(missing, self.ids.take(model, len(missing)), strict=True):
                obj.pk = pk

    # --- claiming -----------------------------------------------------------------------------

    def claim(
        self, step_id: int, worker_id: str, now: datetime, lease_until: datetime
    ) -> Step | None:
        if db().in_atomic_block:  # a caller's transaction: it commits as the caller says
            batch = Batch()
            claim_in_batch(batch, step_id, worker_id, now, lease_until)
            rows = batch.run_in_transaction()
            return claimed_from_row(rows[0] if rows else None, now)
        # A claim is committed without waiting for its WAL to reach the disk. Losing it in a
        # database crash (the last ~200 ms of such commits, wal_writer_delay) is the same as a
        # worker that died right after claiming: the step is queued again, the reaper sends its
        # message again, and it runs again, with the same tool-call idempotency keys. Nothing
        # durable can depend on a lost claim: the WAL is a sequence, so a later synchronous
        # commit (the step's completion, any other transaction) makes every earlier claim
        # durable with it. The completion's fence checks the lease owner as well as the token,
        # so a worker whose claim was lost cannot commit over another worker's new claim.
        batch = Batch()
        batch.add("SET LOCAL synchronous_commit TO off", [])
        claim_in_batch(batch, step_id, worker_id, now, lease_until)
        rows = batch.run()
        return claimed_from_row(rows[0] if rows else None, now)

    # --- writing ------------------------------------------------------------------------------

    def batch(self) -> PgWriteBatch:
        return PgWriteBatch(self)

    def claim_holding(
        self,
        step_id: int,
        worker_id: str,
        now: datetime,
        lease_until: datetime,
        request: HoldRequest,
    ) -> tuple[Step | None, PgWriteBatch]:
        # Committed without waiting for its WAL flush, as a claim on its own is (see ``claim``).
        batch = self.batch()
        batch.batch.add("SET LOCAL synchronous_commit TO off", [])
        at = claim_in_batch(batch.batch, step_id, worker_id, now, lease_until, keep=True)
        batch.hold(step_id, request)  # its guard: the step is running under this worker
        batch.batch.run()
        rows = batch.batch.kept.get(at)
        return claimed_from_row(rows[0] if rows else None, now), batch

    def hold_send(self, step_id: int, request: HoldRequest) -> tuple[PgWriteBatch, Pending]:
        # Committed without waiting for its WAL flush, as a claim is (see ``claim``): a
        # reservation lost in a database crash went with the claim before it, and the step's
        # completion, a later synchronous commit, makes it durable.
        batch = self.batch()
        batch.batch.add("SET LOCAL synchronous_commit TO off", [])
        batch.hold(step_id, request)
        return batch, batch.send()

    def write(self, changes: Changes) -> None:
        self._write_all([changes], "write")

    def write_many(self, many: Sequence[Changes]) -> None:
        if many:
            self._write_all(many, "write_many")

    def _write_all(self, many: Sequence[Changes], name: str) -> None:
        if not db().in_atomic_block:
            raise RuntimeError(f"Store.{name} runs inside the caller's transaction")
        batch = self.batch()
        for changes in many:
            batch.add(changes)
        try:
            rows = batch.batch.run_in_transaction()
        except DatabaseError as exc:
            refused = refusal(exc)
            if refused is not None:
                raise refused from exc
            raise
        for changes in many:  # a claim after the writes: only the last member's has its rows
            batch.claimed(rows if changes is many[-1] else None, changes)

    def wait_close_locked(
        self, run_id: int, wait_id: int, step_id: int, **fields: Any
    ) -> tuple[Run, Step | None]:
        # One statement: the run locked, the wait closed if it is still open, its step read
        # (and locked: a statement that waited for the run's lock reads the step as it is after
        # the transaction it waited for, not as its snapshot saw it before).
        if not db().in_atomic_block:
            raise RuntimeError("Store.wait_close_locked runs inside the caller's transaction")
        names = tuple(fields)
        statement, columns = _wait_close_locked_statement(names)
        row = {
            column: convert(_column_value(fields[name]))
            for (column, _, convert), name in zip(columns, names, strict=True)
        }
        values = execute_prepared(statement, [run_id, wait_id, step_id, dumps(row)])
        if values is None:
            raise Run.DoesNotExist(f"no run {run_id}")
        n_run = len(Run._meta.concrete_fields)
        run = from_row(Run, values[:n_run])
        closed, step_values = values[n_run], values[n_run + 1 :]
        if not closed or step_values[0] is None:
            return run, None
        step = from_row(Step, step_values)
        step.run = run
        return run, step

    def wait_with_run(self, wait_id: int, kind: str) -> Wait | None:
        # Prepared: planning the ORM's join costs more than running it, and compiling it costs
        # a decision's web process more than the decision itself.
        values = execute_prepared(_wait_with_run_statement(), [wait_id, kind])
        if values is None:
            return None
        n_wait, n_run = len(Wait._meta.concrete_fields), len(Run._meta.concrete_fields)
        wait = from_row(Wait, values[:n_wait])
        wait.run = from_row(Run, values[n_wait : n_wait + n_run])
        wait.step = from_row(Step, values[n_wait + n_run :])
        wait.step.run = wait.run
        return wait

    def commit(self, changes: Changes) -> Pending:
        if db().in_atomic_block:
            return super().commit(changes)
        batch = self.batch()
        batch.add(changes)
        return batch.run()


class PgWriteBatch:
    """One transaction's writes (the changes of one or more advances, in order) as one
    multi-statement string: run now (:meth:`run`) or sent without waiting (:meth:`send`)."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.batch = Batch()
        self.members: list[Changes] = []
        self._claims_last = False
        #: Where the claim of :meth:`claim_last` is in the batch (its rows are kept).
        self._claim_at: int | None = None
        #: step id -> (a reservation asked for it, the position of the statement that answers)
        self.holds: dict[int, tuple[HoldRequest, int]] = {}
        #: The settlements written in the batch, with the position of their statement.
        self.settled: list[tuple[Settlement, int]] = []
        #: The budget blocks settled in it (:meth:`settle`).
        self.closes: list[Settlement] = []

    def add(self, changes: Changes) -> None:
        """Render ``changes`` into the batch (ids are assigned now)."""
        self.settled.extend(render(self.store, self.batch, changes))
        self.members.append(changes)

    def claim_last(
        self, step_id: int, worker_id: str, now: datetime, lease_until: datetime
    ) -> None:
        """The batch claims ``step_id`` for the worker after its writes (only a hold for that
        step may follow); its row is kept for :meth:`claimed_step`."""
        self._claim_at = claim_in_batch(self.batch, step_id, worker_id, now, lease_until, keep=True)
        self._claims_last = True

    def extend(self, other: WriteBatch) -> None:
        """Append ``other``'s writes, to commit in this batch's transaction after its own."""
        assert isinstance(other, PgWriteBatch), "only batches of the same store join"
        offset = len(self.batch.statements)
        self.batch.extend(other.batch)
        self.members.extend(other.members)
        self.holds.update(
            {step_id: (request, at + offset) for step_id, (request, at) in other.holds.items()}
        )
        if other._claim_at is not None:
            self._claim_at = other._claim_at + offset
        self.settled.extend((settlement, at + offset) for settlement, at in other.settled)
        self.closes.extend(other.closes)

    def claimed_step(self, rows: list[Any] | None, now: datetime) -> Step | None:
        """The step :meth:`claim_last` claimed, from the batch's answer (``None``: another
        worker had it)."""
        if self._claim_at is not None:
            rows = self.batch.kept.get(self._claim_at)
        return claimed_from_row(rows[0] if rows else None, now)

    def settle(self, settlement: Settlement, now: datetime) -> None:
        self.settled.append(
            (settlement, self.batch.add_prepared(*settlement_prepared(settlement, now)))
        )
        self.closes.append(settlement)

    def settle_many(self, settlements: list[Settlement], now: datetime) -> None:
        self.batch.add_prepared(*settlements_prepared(settlements, now))
        self.closes.extend(settlements)

    def hold(self, step_id: int, request: HoldRequest, *, with_settlement: bool = False) -> None:
        if with_settlement and self.settled:
            settlement, at = self.settled[-1]
            ids = hold_scope_ids(request)
            if all(ids == frozenset(s.scope_ids) for s, _ in self.settled):
                # The last settlement's statement becomes settle-and-reserve: each scope row is
                # written once for both. Its place is after the INSERT of the step (the last
                # member's, whose guard reads it) and before any claim.
                statement, params = settle_hold_prepared(settlement, request)
                self.batch.prepared.append(statement)
                self.batch.statements[at] = (statement.execute, params, statement)
                self.batch.keep.add(at)
                self.holds[step_id] = (request, at)
                return
        at = -1
        for sql, params in hold_statements(request):
            if isinstance(sql, Prepared):
                at = self.batch.add_prepared(sql, params)
            else:
                at = self.batch.add(sql, params)
        self.batch.keep.add(at)
        self.holds[step_id] = (request, at)

    def held(self, step_id: int) -> Held | None:
        found = self.holds.get(step_id)
        if found is None:
            return None
        request, at = found
        rows = self.batch.kept.get(at)  # none: the batch failed, and nothing was reserved
        return hold_answer(request, rows[0] if rows else None)

    def claimed(self, rows: list[Any] | None, changes: Changes) -> None:
        if changes.claim_after is not None:
            changes.local_step = claimed_from_row(rows[0] if rows else None, changes.now)

    def run(self) -> Pending:
        try:
            rows = self.batch.run()
        except DatabaseError as exc:
            refused = refusal(exc)
            if refused is None:
                raise
            return Pending(error=refused)
        return Pending(rows)

    def send(self) -> InFlightPending:
        """Send the batch and return at once; the server runs and commits it meanwhile."""
        return InFlightPending(self.batch.send())


class InFlightPending(Pending):
    """A batch sent without waiting: :meth:`result` reads the server's answer (once)."""

    def __init__(self, inflight: InFlight) -> None:
        super().__init__()
        self.inflight = inflight

    def result(self) -> list[Any] | None:
        try:
            return self.inflight.result()
        except DatabaseError as exc:
            refused = refusal(exc)
            if refused is not None:
                raise refused from exc
            raise


def render(store: PostgresStore, batch: Batch, changes: Changes) -> list[tuple[Settlement, int]]:
    """The statements that write ``changes``, in the order every writer of a run uses: the run
    row first (it is what serialises them), then the fenced step, then the rest. Returns the
    settlements written, with their statements' positions."""
    run, now = changes.run, changes.now
    if changes.insert_run:
        store.assign_ids(Run, [run])
    store.assign_ids(Step, changes.new_steps)
    store.assign_ids(Wait, changes.new_waits)
    store.assign_ids(RunEvent, changes.new_events)
    expected = changes.expected_version
    run.version = (expected if expected is not None else run.version) + 1
    if changes.insert_run:
        insert(Run, [run], batch=batch)
        changes.insert_run = False
    elif expected is not None:
        update_run_checked(batch, run, expected)
    else:
        update(run, RUN_FIELDS, batch=batch)
    fence = changes.fence
    if fence is not None:
        if fence.claims:
            claim_completed_checked(batch, fence.step_id, fence.token - 1, fence.values, now)
        else:
            fence_step_checked(batch, fence.step_id, fence.token, fence.owner, fence.values)
    for step, fields in changes.step_updates.values():
        update(step, tuple(fields), batch=batch)
    changes.step_updates = {}
    # The policy's decisions about the new steps, in the same statement as the steps.
    decisions = (PolicyDecision, changes.decision_json_rows()) if changes.decisions else None
    insert(Step, changes.new_steps, batch=batch, also=decisions)
    insert(Wait, changes.new_waits, batch=batch)
    for wait, fields in changes.wait_updates:
        update(wait, tuple(fields), batch=batch)
    insert(RunEvent, changes.new_events, batch=batch)
    for event, fields in changes.event_updates:
        update(event, tuple(fields), batch=batch)
    insert(StateVersion, changes.state_versions, returning=False, batch=batch)
    insert(ToolCall, changes.tool_calls, returning=False, batch=batch)
    settled = [
        (settlement, batch.add_prepared(*settlement_prepared(settlement, now)))
        for settlement in changes.settlements
    ]
    settled = [(s, at) for s, at in settled if not s.block]  # a block's call locks no scope row
    audit_record_many(changes.audit_entries(), now=now, batch=batch)
    if changes.claim_after is not None:
        step_id, worker, lease_until = changes.claim_after
        claim_in_batch(batch, step_id, worker, now, lease_until)
    return settled


# --- statements ---------------------------------------------------------------------------------


@cache
def _step_columns() -> str:
    return ", ".join(f"s.{db().ops.quote_name(f.column)}" for f in Step._meta.concrete_fields)


@cache
def _run_columns(alias: str) -> str:
    return ", ".join(f"{alias}.{db().ops.quote_name(f.column)}" for f in Run._meta.concrete_fields)


@cache
def _claim_statement() -> Prepared:
    step_t, run_t = Step._meta.db_table, Run._meta.db_table
    # $1 step id, $2 worker, $3 lease expiry, $4 now; the constants are part of the statement.
    running, queued, run_queued = (
        f"'{v}'" for v in (StepStatus.RUNNING, StepStatus.QUEUED, RunStatus.QUEUED)
    )
    system = f"'{ActorType.SYSTEM}'"
    audit_rows = f"""
        SELECT $4, {system}, $2, {int(Verb.STEP_CLAIMED)}, 'step', c.id::text, c.run_id, c.id, r.trace_id, '',
               jsonb_build_object('attempt', c.attempt, 'worker', $2)
        FROM c JOIN {run_t} r ON r.id = c.run_id
        UNION ALL
        SELECT $4, {system}, $2, {int(Verb.RUN_STARTED)}, 'run', started.id::text, started.id, NULL,
               started.trace_id, '', '{{}}'::jsonb
        FROM started"""
    sql = f"""
    WITH c AS (
        UPDATE {step_t} s SET status = {running}, attempt = s.attempt + 1, lease_owner = $2,
               lease_expires_at = $3, started_at = COALESCE(s.started_at, $4)
        WHERE s.id = $1 AND s.status = {queued}{BY_KEY} AND s.available_at <= $4
        RETURNING {_step_columns()}
    ), started AS (
        UPDATE {run_t} r SET status = {running}, started_at = $4, updated_at = $4,
               version = r.version + 1
        WHERE r.id = (SELECT run_id FROM c) AND r.status = {run_queued}
        RETURNING r.id, r.trace_id
    ), audit AS ({audit_insert_from(audit_rows)}
    )
    SELECT {_step_columns()}, {_run_columns("r")}, (SELECT count(*) FROM started)
    FROM c s JOIN {run_t} r ON r.id = s.run_id
    """
    return Prepared(sql, ["bigint", "text", "timestamptz", "timestamptz"])


def claim_in_batch(
    batch: Batch,
    step_id: int,
    worker_id: str,
    now: datetime,
    lease_until: datetime,
    *,
    keep: bool = False,
) -> int:
    """Add the claim of ``step_id`` to ``batch`` (same transaction); its rows are the batch's
    when it is the last statement (or kept, with ``keep``), for :func:`claimed_from_row`.
    Returns its position."""
    return batch.add_prepared(_claim_statement(), [step_id, worker_id, lease_until, now], keep=keep)


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


@cache
def _wait_with_run_statement() -> Prepared:
    """$1 wait id, $2 its kind: the wait's, its run's and its step's columns."""
    qn = db().ops.quote_name
    wait_t, run_t, step_t = (qn(m._meta.db_table) for m in (Wait, Run, Step))
    wait_columns = ", ".join(f"w.{qn(f.column)}" for f in Wait._meta.concrete_fields)
    sql = f"""
    SELECT {wait_columns}, {_run_columns("r")}, {_step_columns()}
    FROM {wait_t} w JOIN {run_t} r ON r.id = w.run_id JOIN {step_t} s ON s.id = w.step_id
    WHERE w.id = $1 AND w.kind = $2
    """
    return Prepared(sql, ["bigint", "text"])


def _column_value(value: Any) -> Any:
    """A field's value as its column holds it (a related object: its id)."""
    return value.pk if isinstance(value, models.Model) else value


@cache
def _wait_close_locked_statement(
    fields: tuple[str, ...],
) -> tuple[Prepared, list[tuple[str, str, Any]]]:
    """$1 run id, $2 wait id, $3 step id, $4 the wait's new ``fields`` as a JSON row. One row:
    the run's columns, whether the wait was closed, the step's columns (NULLs if not closed).
    The run is locked first, the wait then (the order every writer of a run uses)."""
    qn = db().ops.quote_name
    run_t, wait_t, step_t = (qn(m._meta.db_table) for m in (Run, Wait, Step))
    columns = json_columns(Wait, fields)
    assignments = ", ".join(f"{qn(column)} = x.{qn(column)}" for column, _, _ in columns)
    sql = f"""
    WITH r AS MATERIALIZED (
        SELECT {_run_columns("t")} FROM {run_t} t WHERE t.id = $1 FOR UPDATE
    ), w AS (
        UPDATE {wait_t} t SET {assignments} FROM jsonb_populate_record(NULL::{wait_t}, $4) x
        WHERE t.id = $2 AND t.status = '{WaitStatus.OPEN}'{BY_KEY} AND t.run_id = (SELECT id FROM r)
        RETURNING t.id
    ), s AS MATERIALIZED (
        SELECT {_step_columns()} FROM {step_t} s
        WHERE s.id = $3 AND EXISTS (SELECT 1 FROM w) FOR NO KEY UPDATE
    )
    SELECT {_run_columns("r")}, (SELECT count(*) FROM w), {_step_columns()}
    FROM r LEFT JOIN s ON true
    """
    return Prepared(sql, ["bigint", "bigint", "bigint", "jsonb"]), cast(
        "list[tuple[str, str, Any]]", columns
    )


def update_run_checked(batch: Batch, run: Run, expected_version: int) -> None:
    """UPDATE the run row only if nobody wrote it since ``expected_version`` was read; otherwise
    abort the transaction with RUN_CHANGED."""
    statement, columns = _checked_update(Run, RUN_FIELDS, "t.version = $3", RUN_CHANGED)
    row = {column: convert(getattr(run, attname)) for column, attname, convert in columns}
    batch.add_prepared(statement, [dumps(row), run.pk, expected_version])


def fence_step_checked(
    batch: Batch, step_id: int, token: int, owner: str, values: dict[str, Any]
) -> None:
    """Move a running step, claimed with ``token`` by ``owner``, to ``values``; otherwise abort
    with LEASE_LOST. The owner counts too: a claim that was lost in a database crash (claims
    are committed without waiting for their WAL flush) can be made again with the same token."""
    statement, columns = _checked_update(
        Step,
        tuple(values),
        f"t.status = '{StepStatus.RUNNING}'{BY_KEY} AND t.attempt = $3 AND t.lease_owner = $4",
        LEASE_LOST,
        ("text",),
    )
    row = {
        column: convert(values[name])
        for (column, _, convert), name in zip(columns, values, strict=True)
    }
    batch.add_prepared(statement, [dumps(row), step_id, token, owner])


def claim_completed_checked(
    batch: Batch, step_id: int, attempt_before: int, values: dict[str, Any], now: datetime
) -> None:
    """Move a queued step straight to ``values``, its claim and its outcome at once, if it is
    still queued at ``attempt_before`` and due; otherwise abort with STEP_TAKEN. For a pure step
    a worker ran before claiming it, committed in its sibling's transaction."""
    statement, columns = _checked_update(
        Step,
        tuple(values),
        f"t.status = '{StepStatus.QUEUED}'{BY_KEY} AND t.attempt = $3 AND t.available_at <= $4",
        STEP_TAKEN,
        ("timestamptz",),
    )
    row = {
        column: convert(values[name])
        for (column, _, convert), name in zip(columns, values, strict=True)
    }
    batch.add_prepared(statement, [dumps(row), step_id, attempt_before, now])


@cache
def _checked_update(
    model: type[models.Model],
    fields: tuple[str, ...],
    condition: str,
    code: str,
    extra: tuple[str, ...] = (),
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
    return Prepared(sql, ["jsonb", "bigint", "bigint", *extra]), cast(
        "list[tuple[str, str, Any]]", columns
    )
