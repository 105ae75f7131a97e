"""The plain store: the ORM, statement by statement, inside the caller's transaction (see
``orchestration.store``)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from django.db import connection, models, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce

from audit.services import Entry, audit_record_many
from audit.verbs import ActorType, Verb
from infra.sql import insert
from orchestration.changes import (
    ACTIVE_STEPS,
    DONE_STEPS,
    MAP_PROGRESS,
    NEEDS,
    OPEN_WAITS,
    TOOL_CALLS,
    UNAPPLIED_EVENTS,
    Changes,
    Fence,
    Snapshot,
)
from orchestration.failures import ESCALATION_TOOL_CALLS
from orchestration.graph import MapProgress
from orchestration.models import (
    STEP_ACTIVE,
    Run,
    RunEvent,
    RunStatus,
    StateVersion,
    Step,
    StepKind,
    StepStatus,
    ToolCall,
    Wait,
    WaitStatus,
)
from policies.active import active_policy
from policies.ledger import Held, HoldRequest, Settlement, settlement_statements
from policies.models import PolicyDecision
from policies.tenants import tenant_by_id

#: The fields of a run row that an advance may change.
RUN_FIELDS = (
    "version",
    "status",
    "state",
    "state_versions",
    "node_visits",
    "pending_joins",
    "active_steps",
    "waiting_steps",
    "step_count",
    "notes",
    "degraded",
    "output",
    "error_code",
    "error_message",
    "started_at",
    "finished_at",
    "updated_at",
)


class WriteRefused(Exception):
    """A write's guard did not hold; nothing of the transaction was written."""


class LeaseLost(WriteRefused):
    """The completing step is no longer held by this attempt (its lease was lost or the step
    was cancelled): its result is discarded."""


class RunChanged(WriteRefused):
    """Another transaction wrote the run since it was read: read it again and recompute."""


class StepTaken(WriteRefused):
    """A queued step a worker ran before claiming it was taken by another worker meanwhile."""


class Pending:
    """A commit whose outcome may not be known yet. :meth:`result` waits for it: the rows of
    the last statement (a claim made in that transaction), or raises why it did not commit."""

    def __init__(self, rows: list[Any] | None = None, error: BaseException | None = None) -> None:
        self._rows, self._error = rows, error

    def result(self) -> list[Any] | None:
        if self._error is not None:
            raise self._error
        return self._rows


class WriteBatch(Protocol):
    """Several completions' writes committed as one transaction in one round trip: what an
    optimistic store (``Store.optimistic``) offers through :meth:`Store.batch`."""

    def add(self, changes: Changes) -> None:
        """Render ``changes`` into the batch (ids are assigned now)."""

    def claim_last(
        self, step_id: int, worker_id: str, now: datetime, lease_until: datetime
    ) -> None:
        """The batch's last statement claims ``step_id`` for the worker."""

    def extend(self, other: WriteBatch) -> None:
        """Append ``other``'s writes, to commit after this batch's own."""

    def claimed_step(self, rows: list[Any] | None, now: datetime) -> Step | None:
        """The step :meth:`claim_last` claimed, from the rows the batch returned."""

    def hold(self, step_id: int, request: HoldRequest, *, with_settlement: bool = False) -> None:
        """Make ``request``'s reservation for ``step_id`` in this batch, after its other writes
        (a refusal writes nothing and does not fail the batch). ``with_settlement``: the step
        is inserted by the batch's own writes, and the batch's one settlement, if it counts
        against the same scope rows, is written in the same statement."""

    def held(self, step_id: int) -> Held | None:
        """The answer to :meth:`hold` for ``step_id``, once the batch was read (None: not asked)."""

    #: The budget blocks :meth:`settle` settled in this batch.
    closes: list[Settlement]

    def settle(self, settlement: Settlement, now: datetime) -> None:
        """Settle ``settlement`` (a budget block the worker stops using) in this batch, after
        its other writes; a later :meth:`hold` with a settlement may join it."""

    def settle_many(self, settlements: list[Settlement], now: datetime) -> None:
        """Settle several budget blocks in this batch, after its other writes, as one
        statement (``policies.ledger.settlements_prepared``)."""

    def run(self) -> Pending:
        """Commit now and wait for the outcome."""

    def send(self) -> Pending:
        """Send the batch and return at once; :meth:`Pending.result` waits for the outcome."""


class Store:
    """The plain implementation (see the module docstring)."""

    #: A completion may check the run row's version at write time instead of locking it first.
    optimistic = False
    #: A commit may be sent without waiting for its answer (``WriteBatch.send``).
    pipelined = False

    def batch(self) -> WriteBatch:
        """A batch of completions in one round trip; only an optimistic store offers one."""
        raise NotImplementedError("this store writes each transaction as it goes: no batches")

    def hold_send(self, step_id: int, request: HoldRequest) -> tuple[WriteBatch, Pending]:
        """Send ``request``'s reservation for ``step_id`` as a transaction of its own without
        waiting for it (a pipelined store only): its answer is :meth:`WriteBatch.held` once
        the returned :class:`Pending` was read."""
        raise NotImplementedError("only a pipelined store sends without waiting")

    def claim_holding(
        self,
        step_id: int,
        worker_id: str,
        now: datetime,
        lease_until: datetime,
        request: HoldRequest,
    ) -> tuple[Step | None, WriteBatch]:
        """:meth:`claim`, and ``request``'s reservation for the step in the same transaction
        (made only if the claim was): its answer is :meth:`WriteBatch.held` of the returned
        batch (a pipelined store only)."""
        raise NotImplementedError("only a pipelined store claims and reserves in one batch")

    # --- claiming -----------------------------------------------------------------------------

    def claim(
        self, step_id: int, worker_id: str, now: datetime, lease_until: datetime
    ) -> Step | None:
        """Take a queued, due step with a lease (and start its run if it was queued): a
        conditional UPDATE, so two workers never both get it. Returns the step with its run."""
        with transaction.atomic():
            claimed = Step.objects.filter(
                pk=step_id, status=StepStatus.QUEUED, available_at__lte=now
            ).update(
                status=StepStatus.RUNNING,
                attempt=F("attempt") + 1,
                lease_owner=worker_id,
                lease_expires_at=lease_until,
                started_at=Coalesce(F("started_at"), now),
            )
            if not claimed:
                return None
            step = Step.objects.select_related("run").get(pk=step_id)
            run = step.run
            entries = [
                Entry(
                    verb=Verb.STEP_CLAIMED,
                    object_type="step",
                    object_id=step.pk,
                    actor_id=worker_id,
                    run_id=run.pk,
                    step_id=step.pk,
                    trace_id=run.trace_id,
                    data={"attempt": step.attempt, "worker": worker_id},
                )
            ]
            if run.status == RunStatus.QUEUED and Run.objects.filter(
                pk=run.pk, status=RunStatus.QUEUED
            ).update(
                status=RunStatus.RUNNING, started_at=now, updated_at=now, version=F("version") + 1
            ):
                run.status, run.started_at, run.version = RunStatus.RUNNING, now, run.version + 1
                entries.append(
                    Entry(
                        verb=Verb.RUN_STARTED,
                        object_type="run",
                        object_id=run.pk,
                        actor_type=ActorType.SYSTEM,
                        actor_id=worker_id,
                        run_id=run.pk,
                        trace_id=run.trace_id,
                    )
                )
            audit_record_many(entries, now=now)
        return step

    # --- reading ------------------------------------------------------------------------------

    def run_get(self, run_id: int, *, lock: bool = False) -> Run:
        """The run row; with ``lock``, locked until the caller's transaction ends (the lock every
        writer of a run takes first). Raises ``Run.DoesNotExist``."""
        rows = Run.objects.select_for_update() if lock else Run.objects
        return rows.get(pk=run_id)

    def step_get(self, step_id: int) -> Step:
        return Step.objects.get(pk=step_id)

    def wait_get(self, wait_id: int, *, kind: str | None = None) -> Wait | None:
        rows = Wait.objects.filter(pk=wait_id)
        if kind is not None:
            rows = rows.filter(kind=kind)
        return rows.select_related("step", "run", "decided_by").first()

    def wait_with_run(self, wait_id: int, kind: str) -> Wait | None:
        """The wait of ``kind`` with its run and step, as an operator's decision reads it before
        it checks who may decide it; ``None`` if there is none (one query here; the PostgreSQL
        store's is a prepared statement)."""
        return self.wait_get(wait_id, kind=kind)

    def snapshot(
        self, run: Run, needs: Collection[str] = (), *, focus: Step | None = None
    ) -> Snapshot:
        """What a decision about ``run`` (and its ``focus`` step) needs, read now. With no
        needs, nothing is read."""
        snap = Snapshot(run=run, focus=focus, loaded=frozenset(needs))
        self._policy(snap)
        if focus is not None:
            focus.run = run
            snap.adopt(focus)
        if not needs:
            return snap
        if ACTIVE_STEPS in needs:
            snap.active = [
                snap.adopt(s)
                for s in Step.objects.filter(run_id=run.pk, status__in=STEP_ACTIVE).order_by("id")
            ]
        if DONE_STEPS in needs:
            snap.done = [
                snap.adopt(s)
                for s in Step.objects.filter(
                    run_id=run.pk,
                    status=StepStatus.SUCCEEDED,
                    kind__in=(StepKind.AGENT, StepKind.ITEM),
                ).order_by("id")
            ]
        if OPEN_WAITS in needs:
            snap.waits = list(
                Wait.objects.filter(run_id=run.pk, status=WaitStatus.OPEN)
                .select_related("step")
                .order_by("id")
            )
            for wait in snap.waits:
                wait.step = snap.adopt(wait.step)
        if UNAPPLIED_EVENTS in needs:
            snap.events = list(
                RunEvent.objects.filter(
                    run_id=run.pk, wait__isnull=True, applied_at__isnull=True
                ).order_by("id")
            )
        if TOOL_CALLS in needs and focus is not None and focus.pk is not None:
            snap.focus_tool_calls = list(
                ToolCall.objects.filter(step_id=focus.pk).order_by("id")[:ESCALATION_TOOL_CALLS]
            )
        if MAP_PROGRESS in needs and focus is not None and focus.parent_id is not None:
            snap.map_progress = self._map_progress(snap, run, focus)
        return snap

    def _map_progress(self, snap: Snapshot, run: Run, item: Step) -> MapProgress:
        assert item.parent_id is not None  # a map item always has its map step as parent
        parent = snap.steps.get(item.parent_id) or snap.adopt(Step.objects.get(pk=item.parent_id))
        siblings = Step.objects.filter(parent_id=parent.pk)
        following = siblings.filter(status=StepStatus.PENDING).order_by("item").first()
        if following is not None:
            return MapProgress(parent=parent, next_pending=snap.adopt(following), others_active=0)
        # The run row counts active steps: with this item the only one, no sibling is active.
        others = 0
        if run.active_steps > 1:
            others = (
                siblings.filter(
                    status__in=(StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING)
                )
                .exclude(pk=item.pk)
                .count()
            )
        if others:
            return MapProgress(parent=parent, next_pending=None, others_active=others)
        outputs = dict(
            siblings.filter(status=StepStatus.SUCCEEDED)
            .exclude(pk=item.pk)
            .values_list("item", "output")
        )
        return MapProgress(parent=parent, next_pending=None, others_active=0, outputs=outputs)

    def new_run_snapshot(self, run: Run) -> Snapshot:
        """A run not written yet has no other rows: everything is known to be empty."""
        snap = Snapshot(run=run, loaded=NEEDS)
        self._policy(snap)
        return snap

    def _policy(self, snap: Snapshot) -> None:
        """What actions are decided with: the policy in force and the run's tenant (both cached
        per process, so this costs no query in the common case)."""
        snap.policy = active_policy()
        if snap.policy is not None:
            snap.tenant = tenant_by_id(snap.run.tenant_id)

    # --- writing ------------------------------------------------------------------------------

    def write(self, changes: Changes) -> None:
        """Write ``changes`` inside the caller's transaction. Raises :class:`LeaseLost`,
        :class:`StepTaken` or :class:`RunChanged` (the caller's transaction must then roll back)
        when a guard does not hold; the guards are checked before anything else is written."""
        if not connection.in_atomic_block:
            raise RuntimeError("Store.write runs inside the caller's transaction")
        run, now = changes.run, changes.now
        if changes.fence is not None:
            self._fence(changes.fence, now)
        expected = changes.expected_version
        run.version = (expected if expected is not None else run.version) + 1
        if changes.insert_run:
            run.save(force_insert=True)
            changes.insert_run = False
        elif expected is not None:
            values = {name: getattr(run, name) for name in RUN_FIELDS}
            if not Run.objects.filter(pk=run.pk, version=expected).update(**values):
                raise RunChanged(run.pk)
        else:
            run.save(update_fields=RUN_FIELDS)
        for step, fields in changes.step_updates.values():
            Step.objects.filter(pk=step.pk).update(**fields)
        changes.step_updates = {}
        # A map's items refer to their map step, which must have its id first.
        new_steps = changes.new_steps
        first = [s for s in new_steps if s.parent is None or s.parent.pk is not None]
        later = [s for s in new_steps if s not in first]
        for group in (first, later):
            insert(Step, group)
        for wait in changes.new_waits:
            wait.step = wait.step  # the step's id, now that it has one
        insert(Wait, changes.new_waits)
        for wait, fields in changes.wait_updates:
            Wait.objects.filter(pk=wait.pk).update(**fields)
        insert(RunEvent, changes.new_events)
        for event, fields in changes.event_updates:
            RunEvent.objects.filter(pk=event.pk).update(**fields)
        insert(StateVersion, changes.state_versions, returning=False)
        insert(ToolCall, changes.tool_calls, returning=False)
        insert(PolicyDecision, changes.decision_rows(), returning=False)
        with connection.cursor() as cursor:
            for settlement in changes.settlements:
                for sql, params in settlement_statements(settlement, now):
                    cursor.execute(sql, params)
        audit_record_many(changes.audit_entries(), now=now)
        if changes.claim_after is not None:
            step_id, worker, lease_until = changes.claim_after
            claimed = self.claim(step_id, worker, now, lease_until)
            changes.local_step = claimed

    def _fence(self, fence: Fence, now: datetime) -> None:
        rows = Step.objects.filter(pk=fence.step_id)
        if fence.claims:
            rows = rows.filter(
                status=StepStatus.QUEUED, attempt=fence.token - 1, available_at__lte=now
            )
        else:
            rows = rows.filter(
                status=StepStatus.RUNNING, attempt=fence.token, lease_owner=fence.owner
            )
        if not rows.update(**fence.values):
            raise StepTaken(fence.step_id) if fence.claims else LeaseLost(fence.step_id)

    def commit(self, changes: Changes) -> Pending:
        """Write ``changes`` as a transaction of their own (or inside the caller's, if one is
        open). The outcome is known when this returns here; see ``PostgresStore`` for a commit
        whose answer comes later."""
        try:
            with transaction.atomic():
                self.write(changes)
        except WriteRefused as refused:
            return Pending(error=refused)
        return Pending()

    # --- services -----------------------------------------------------------------------------

    def wait_close(self, wait_id: int, **fields: Any) -> bool:
        """Close an open wait with ``fields``: exactly one caller wins (a conditional UPDATE)."""
        return bool(Wait.objects.filter(pk=wait_id, status=WaitStatus.OPEN).update(**fields))

    def wait_close_locked(
        self, run_id: int, wait_id: int, step_id: int, **fields: Any
    ) -> tuple[Run, Step | None]:
        """Inside the caller's transaction: lock the run, close its open wait ``wait_id`` with
        ``fields`` (exactly one caller wins) and read the step that waits on it. Returns the
        run as locked and the step, or ``None`` for the step when the wait was not open (nothing
        was written). Raises ``Run.DoesNotExist``. Here three statements; one on PostgreSQL."""
        if not connection.in_atomic_block:
            raise RuntimeError("Store.wait_close_locked runs inside the caller's transaction")
        run = self.run_get(run_id, lock=True)
        if not Wait.objects.filter(pk=wait_id, run_id=run_id, status=WaitStatus.OPEN).update(
            **fields
        ):
            return run, None
        step = self.step_get(step_id)
        step.run = run
        return run, step

    def write_many(self, many: Sequence[Changes]) -> None:
        """Write several advances' changes, in order, inside the caller's transaction (see
        :meth:`write`; on PostgreSQL, one round trip for them all)."""
        for changes in many:
            self.write(changes)

    def run_by_idempotency_key(self, scope: str, key: str) -> Run | None:
        return Run.objects.filter(idempotency_scope=scope, idempotency_key=key).first()

    def event_get(self, run: Run, event_id: str) -> RunEvent | None:
        return RunEvent.objects.filter(run=run, event_id=event_id).first()

    def open_event_wait(self, run: Run, name: str) -> Wait | None:
        return (
            Wait.objects.filter(run=run, kind="event", name=name, status=WaitStatus.OPEN)
            .select_related("step")
            .order_by("id")
            .first()
        )

    def assign_ids(self, model: type[models.Model], objs: Sequence[models.Model]) -> None:
        """Give unsaved rows their ids before they are written (plain: the insert does)."""

    # --- the reaper ---------------------------------------------------------------------------

    def leases_expired(self, now: datetime, limit: int) -> list[tuple[int, int]]:
        """(step id, run id) of running steps whose lease expired."""
        return list(
            Step.objects.filter(status=StepStatus.RUNNING, lease_expires_at__lt=now).values_list(
                "id", "run_id"
            )[:limit]
        )

    def queued_unsent(self, now: datetime, stale: datetime, limit: int) -> list[tuple[int, str]]:
        """(step id, pool) of due queued steps whose wake-up was never sent, failed, or was sent
        before ``stale`` without leading to a claim."""
        return list(
            Step.objects.filter(status=StepStatus.QUEUED, available_at__lte=now)
            .filter(Q(published_at__isnull=True) | Q(published_at__lt=stale))
            .values_list("id", "pool")[:limit]
        )

    def mark_sent(self, step_ids: Iterable[int], now: datetime | None) -> None:
        """Record when the wake-ups of these queued steps went out (``None``: they did not, so
        the reaper sends them at its next pass)."""
        Step.objects.filter(pk__in=list(step_ids), status=StepStatus.QUEUED).update(
            published_at=now
        )

    def waits_expired(self, now: datetime, limit: int) -> list[tuple[int, int]]:
        return list(
            Wait.objects.filter(status=WaitStatus.OPEN, deadline_at__lt=now).values_list(
                "id", "run_id"
            )[:limit]
        )

    def runs_overdue(self, now: datetime, statuses: Sequence[str], limit: int) -> list[int]:
        return list(
            Run.objects.filter(status__in=statuses, deadline_at__lt=now).values_list(
                "id", flat=True
            )[:limit]
        )

    def leases_renew(self, held: Iterable[tuple[int, int, str]], until: datetime) -> None:
        """Extend the leases of (step id, token, owner); a lease that was lost is not renewed."""
        for step_id, token, owner in held:
            Step.objects.filter(
                pk=step_id, status=StepStatus.RUNNING, attempt=token, lease_owner=owner
            ).update(lease_expires_at=until)

    def running_step(self, step_id: int, token: int) -> Step | None:
        """The step if it is still running under ``token`` (with its run)."""
        return (
            Step.objects.select_related("run")
            .filter(pk=step_id, status=StepStatus.RUNNING, attempt=token)
            .first()
        )
