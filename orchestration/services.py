"""Every write to runs from outside the engine: submit, cancel, decide, send an event.

Each service owns its transaction, locks the run row, writes its audit rows inside it, and
sends wake-ups and live events only after commit. Views, API handlers, tasks and commands call
these and nothing else to change a run.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from audit.verbs import ActorType, Verb
from infra.sql import Batch, db, is_postgres, pipeline
from orchestration.engine import (
    CANCELLED,
    NeedsTransaction,
    Tx,
    digest,
    new_trace_id,
    node_of,
    output_contract,
    run_lock,
    step_action,
)
from orchestration.errors import (
    Code,
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    SignalboxError,
)
from orchestration.models import (
    ESCALATION_ACTIONS,
    Decision,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    Wait,
    WaitKind,
    WaitStatus,
)
from orchestration.registry import agent_class, workflow_get
from orchestration.store import assign_ids


def _actor(user: User | None) -> tuple[str, str]:
    if user is None:
        return ActorType.SYSTEM, ""
    return ActorType.HUMAN, user.get_username()


def _check_size(payload: Any, what: str) -> None:
    size = len(json.dumps(payload, separators=(",", ":"), default=str).encode())
    limit = settings.SIGNALBOX["MAX_PAYLOAD_BYTES"]
    if size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes; the limit is {limit}", detail={"size": size, "limit": limit})


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _validated(contract: type[BaseModel], payload: Any, *, code: str, message: str) -> Any:
    """``payload`` as ``contract`` normalises it, or InvalidInput (422) listing what is wrong."""
    try:
        return contract.model_validate(payload).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidInput(message, code=code, detail=_validation_detail(exc)) from exc


@dataclass
class Submitted:
    run: Run
    created: bool


def run_submit(
    *,
    workflow: str,
    input: dict[str, Any],
    version: int | None = None,
    submitted_by: User | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    tenant: str = "",
    seed: int | None = None,
) -> Submitted:
    """Create a run and its first steps in one transaction; the same idempotency key (per
    submitter) returns the first run instead of creating a second."""
    wf = workflow_get(workflow, version)
    _check_size(input, "run input")
    try:
        state = wf.input.model_validate(input).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidInput(
            f"input does not satisfy {wf.key}'s input contract", code=Code.INPUT_CONTRACT, detail=_validation_detail(exc)
        ) from exc
    scope = str(submitted_by.pk) if submitted_by is not None else "system"

    def seen_before() -> Run | None:
        if not idempotency_key:
            return None
        return Run.objects.filter(idempotency_scope=scope, idempotency_key=idempotency_key).first()

    actor_type, actor_id = _actor(submitted_by)
    now = timezone.now()

    def new_run() -> Run:
        return Run(
            workflow_name=wf.name,
            workflow_version=wf.version,
            status=RunStatus.QUEUED,
            priority=priority,
            tenant=tenant,
            submitted_by=submitted_by,
            idempotency_scope=scope,
            idempotency_key=idempotency_key or None,
            trace_id=new_trace_id(),
            seed=seed if seed is not None else secrets.randbits(48),
            input=input,
            created_at=now,
            updated_at=now,
            deadline_at=now + wf.max_duration,
        )

    def begin(tx: Tx) -> None:
        run = tx.run
        tx.record(Verb.RUN_SUBMITTED, "run", run.pk, payload=input, workflow=wf.key, idempotency_key=idempotency_key or "")
        for key, value in state.items():
            tx.write_state(key, value, writer="submit", step=None)
        try:
            tx.start()
        except SignalboxError as exc:
            tx.fail_run(exc.code, exc.message)
        tx.flush()

    try:
        # The batched submit finds a key seen before by the unique constraint refusing its run
        # (below) rather than by a lookup first, which would cost every submit for a rare case.
        batched = is_postgres() and not db().in_atomic_block
        run = _submit_batched(new_run(), now, begin, actor_type, actor_id) if batched else None
        if run is None:
            if (existing := seen_before()) is not None:
                return Submitted(existing, created=False)
            with pipeline(), transaction.atomic():
                run = new_run()
                run.save(force_insert=True)
                tx = Tx(run, now, actor_type=actor_type, actor_id=actor_id)
                begin(tx)
    except IntegrityError:
        # The key was seen before, or two submits with one key raced: the unique constraint let
        # exactly one run in, and that is the one returned.
        if (existing := seen_before()) is None:
            raise
        return Submitted(existing, created=False)
    return Submitted(run, created=True)


def _submit_batched(run: Run, now: Any, begin: Any, actor_type: str, actor_id: str) -> Run | None:
    """PostgreSQL, common case: the run row, its state, first steps and audit rows go in ONE
    multi-statement batch (one round trip, one implicit transaction); ``None`` when the start
    needs a real transaction (a map fan-out, an early event, a run failing at its start)."""
    # The run's id from the table's own sequence, from a block this process reserved (as step
    # ids are): no round trip of its own. Lists order runs by creation time, then id.
    assign_ids(Run, [run])
    batch = Batch()
    tx = Tx(run, now, actor_type=actor_type, actor_id=actor_id, batch=batch, new_run=True)
    try:
        begin(tx)
    except NeedsTransaction:
        return None
    batch.run()
    for callback in tx.after_commit:
        callback()
    return run


def run_cancel(*, run_id: int, user: User | None, reason: str = "") -> Run:
    """Cancel a run that has not ended: its active steps are cancelled and its waits closed."""
    actor_type, actor_id = _actor(user)
    with transaction.atomic():
        run = _lock_or_404(run_id)
        if run.is_terminal:
            raise Conflict(f"run {run_id} already {run.status}", code=Code.RUN_TERMINAL, detail={"status": run.status})
        if run.status == RunStatus.COMPENSATING:
            raise Conflict(
                f"run {run_id} already ended ({run.error_code}) and is undoing its completed steps; "
                "abort an escalated compensation to stop it",
                code=Code.RUN_COMPENSATING, detail={"status": run.status},
            )
        tx = Tx(run, timezone.now(), actor_type=actor_type, actor_id=actor_id)
        tx.fail_run(CANCELLED, reason or f"cancelled by {actor_id or 'system'}", verb=Verb.RUN_CANCELLED)
        tx.flush()
    return run


def approval_decide(
    *,
    wait_id: int,
    user: User | None,
    decision: str,
    reason: str = "",
    edited_input: dict[str, Any] | None = None,
    run_id: int | None = None,
) -> Wait:
    """Apply an operator's decision to an open approval. Exactly one decision wins; a second
    one (or one on an expired or stale approval) raises Conflict."""
    if decision not in Decision.values:
        raise InvalidInput(f"decision must be one of {', '.join(Decision.values)}", code=Code.INVALID_DECISION)
    if decision == Decision.EDIT and edited_input is None:
        raise InvalidInput("edit-then-approve needs edited_input", code=Code.EDITED_INPUT_MISSING)
    if decision != Decision.EDIT and edited_input is not None:
        raise InvalidInput("edited_input is only accepted with decision 'edit'", code=Code.EDITED_INPUT_UNEXPECTED)
    wait = Wait.objects.filter(pk=wait_id, kind=WaitKind.APPROVAL).select_related("step").first()
    if wait is None or (run_id is not None and wait.run_id != run_id):
        raise NotFound(f"no approval {wait_id}", code=Code.APPROVAL_NOT_FOUND)
    if decision == Decision.EDIT:
        assert edited_input is not None
        _check_size(edited_input, "edited input")
        edited_input = _validated(
            agent_class(wait.step.agent).Input, edited_input, code=Code.INPUT_CONTRACT,
            message=f"edited input does not satisfy {wait.step.agent!r}'s input contract",
        )
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    with transaction.atomic():
        run = run_lock(wait.run_id)
        decided = dict(
            status=WaitStatus.REJECTED if decision == Decision.REJECT else WaitStatus.APPROVED,
            decision=decision, decided_by=user, decided_at=now, decision_reason=reason, edited_input=edited_input,
        )
        won = Wait.objects.filter(pk=wait_id, status=WaitStatus.OPEN).update(**decided)
        if not won:
            current = Wait.objects.select_related("decided_by").get(pk=wait_id)
            by = current.decided_by.get_username() if current.decided_by else "the system"
            raise Conflict(
                f"approval {wait_id} is already {current.status} (by {by} at {current.decided_at:%Y-%m-%d %H:%M:%S} UTC)"
                if current.decided_at else f"approval {wait_id} is {current.status}",
                code=Code.ALREADY_DECIDED,
                detail={"status": current.status, "decided_by": by},
            )
        # The row is now what was read before the lock plus what this update wrote: nothing else
        # changes an open wait, and it was open. The step is read under the lock.
        for field, value in decided.items():
            setattr(wait, field, value)
        step = Step.objects.get(pk=wait.step_id)
        tx = Tx(run, now, actor_type=actor_type, actor_id=actor_id)
        _apply_decision(tx, wait, step, decision, reason, edited_input)
        tx.flush()
    wait.run, wait.step = run, step  # as they are now, for whoever shows the decision
    return wait


def _apply_decision(
    tx: Tx, wait: Wait, step: Step, decision: str, reason: str, edited_input: dict[str, Any] | None
) -> None:
    if decision == Decision.REJECT:
        tx.record(Verb.APPROVAL_REJECTED, "wait", wait.pk, step=step, reason=reason)
        tx.fail_step(step, SignalboxError(f"approval rejected: {reason or 'no reason given'}", code=Code.APPROVAL_REJECTED))
        return
    node = tx.wf.node(step.node)
    if decision == Decision.EDIT:
        step.input_override = edited_input
        Step.objects.filter(pk=step.pk).update(input_override=edited_input)
        verb = Verb.APPROVAL_EDITED
    else:
        verb = Verb.APPROVAL_APPROVED
    approved = digest(step_action(step, node, tx.run))
    tx.record(verb, "wait", wait.pk, step=step, payload=edited_input, reason=reason, approved_digest=approved)
    tx.move(step, StepStatus.QUEUED, approved_digest=approved, available_at=tx.now, published_at=tx.now)
    tx.publish.append((step, 0.0))


#: A step an operator skipped carries this prefix in ``degraded``: it has no side effect to undo.
SKIPPED = "skipped by"


def escalation_resolve(
    *,
    wait_id: int,
    user: User | None,
    action: str,
    reason: str = "",
    output: dict[str, Any] | None = None,
    run_id: int | None = None,
) -> Wait:
    """An operator's answer to an escalated step (the dead-letter list):

    * ``retry``: the step runs again with its node's agent and a fresh attempt budget;
    * ``skip``: the step succeeds with ``output``, checked against the step's output contract,
      and the run goes on (marked degraded);
    * ``abort``: the step fails and the run with it (completed side effects are compensated;
      on a compensation, the remaining compensations are stopped).

    Exactly one answer wins; another raises Conflict (409 ``already_decided``)."""
    if action not in ESCALATION_ACTIONS:
        raise InvalidInput(
            f"action must be one of {', '.join(ESCALATION_ACTIONS)}", code=Code.INVALID_ACTION,
            detail={"action": action},
        )
    if action == Decision.SKIP and output is None:
        raise InvalidInput("skip needs output: the value the step should have produced", code=Code.OUTPUT_MISSING)
    if action != Decision.SKIP and output is not None:
        raise InvalidInput("output is only accepted with action 'skip'", code=Code.OUTPUT_UNEXPECTED)
    wait = Wait.objects.filter(pk=wait_id, kind=WaitKind.ESCALATION).select_related("step", "run").first()
    if wait is None or (run_id is not None and wait.run_id != run_id):
        raise NotFound(f"no escalation {wait_id}", code=Code.ESCALATION_NOT_FOUND)
    if wait.status != WaitStatus.OPEN:
        raise _already_answered(wait_id)  # before judging the value: it could not apply anyway
    if output is not None:
        _check_size(output, "skip output")
        wf = workflow_get(wait.run.workflow_name, wait.run.workflow_version)
        contract = output_contract(wait.step, node_of(wf, wait.step))
        output = _validated(
            contract, output, code=Code.OUTPUT_CONTRACT,
            message=f"the skip value does not satisfy {contract.__name__}, the output contract of {wait.step.key!r}",
        )
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    with transaction.atomic():
        run = run_lock(wait.run_id)
        won = Wait.objects.filter(pk=wait_id, status=WaitStatus.OPEN).update(
            status=WaitStatus.RESOLVED, decision=action, decided_by=user, decided_at=now,
            decision_reason=reason, payload=output,
        )
        if not won:
            raise _already_answered(wait_id)
        wait.refresh_from_db()
        step = Step.objects.get(pk=wait.step_id)
        tx = Tx(run, now, actor_type=actor_type, actor_id=actor_id)
        node = node_of(tx.wf, step)
        who = actor_id or "the system"
        if action == Decision.RETRY:
            compensation = step.kind == StepKind.COMPENSATE
            agent = step.agent if compensation else node.agent
            # The same budget the step had at first: a compensation's is its agent's own.
            budget = (None if compensation else node.max_attempts) or agent_class(agent).max_attempts
            tx.record(Verb.ESCALATION_RETRIED, "wait", wait.pk, step=step, reason=reason, agent=agent)
            tx.move(
                step, StepStatus.QUEUED, agent=agent, pool=node.pool or agent_class(agent).pool, failures=0,
                max_attempts=budget or tx.wf.default_max_attempts,
                available_at=now, published_at=now, error_class="", error_code="", error_message="", error_detail=None,
            )
            tx.publish.append((step, 0.0))
        elif action == Decision.SKIP:
            assert output is not None
            note = f"{SKIPPED} {who} with a supplied value" + (f": {reason}" if reason else "")
            tx.record(Verb.ESCALATION_SKIPPED, "wait", wait.pk, step=step, payload=output, reason=reason)
            # The failure that led here stays in the escalation's context and the attempts log.
            tx.move(
                step, StepStatus.SUCCEEDED, output=output, finished_at=now, degraded=note[:500],
                error_class="", error_code="", error_message="", error_detail=None,
            )
            tx.note_degraded(step, note)
            try:
                tx.step_succeeded(step, node, output, {})
            except SignalboxError as exc:
                tx.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
        else:
            tx.record(Verb.ESCALATION_ABORTED, "wait", wait.pk, step=step, reason=reason)
            tx.fail_step(step, SignalboxError(
                f"aborted by {who} after escalation" + (f": {reason}" if reason else ""), code=Code.ABORTED,
            ))
        tx.flush()
    return wait


def _already_answered(wait_id: int) -> Conflict:
    current = Wait.objects.select_related("decided_by").get(pk=wait_id)
    by = current.decided_by.get_username() if current.decided_by else "the system"
    when = f" at {current.decided_at:%Y-%m-%d %H:%M:%S} UTC" if current.decided_at else ""
    what = f"{current.decision} by {by}" if current.decision else f"{current.status} by {by}"
    return Conflict(
        f"escalation {wait_id} is already {current.status} ({what}{when})",
        code=Code.ALREADY_DECIDED,
        detail={"status": current.status, "decision": current.decision, "decided_by": by},
    )


@dataclass
class EventDelivery:
    event: RunEvent
    #: The event reached a waiting step now (otherwise it is kept until the run waits for it).
    applied: bool
    #: This ``event_id`` was received before; nothing changed.
    duplicate: bool


def run_send_event(
    *, run_id: int, name: str, event_id: str, payload: dict[str, Any], user: User | None
) -> EventDelivery:
    """Deliver a named outside event to a run, once: the same ``event_id`` sent again is a
    no-op that returns the first delivery with ``duplicate`` set."""
    _check_size(payload, "event payload")
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    with transaction.atomic():
        run = _lock_or_404(run_id)
        existing = RunEvent.objects.filter(run=run, event_id=event_id).first()
        if existing is not None:
            return EventDelivery(existing, applied=False, duplicate=True)
        if run.is_terminal:
            raise Conflict(f"run {run_id} already {run.status}", code=Code.RUN_TERMINAL, detail={"status": run.status})
        event = RunEvent.objects.create(run=run, name=name, event_id=event_id, payload=payload, received_at=now)
        tx = Tx(run, now, actor_type=actor_type, actor_id=actor_id)
        tx.record(Verb.EVENT_RECEIVED, "event", event.pk, payload=payload, name=name, event_id=event_id)
        wait = (
            Wait.objects.filter(run=run, kind=WaitKind.EVENT, name=name, status=WaitStatus.OPEN)
            .select_related("step")
            .order_by("id")
            .first()
        )
        applied = False
        if wait is not None:
            try:
                tx.apply_event(wait, event)
            except SignalboxError as exc:
                tx.fail_run(exc.code, exc.message)
            applied = True
        tx.flush()
    return EventDelivery(event, applied=applied, duplicate=False)


def _lock_or_404(run_id: int) -> Run:
    try:
        return run_lock(run_id)
    except Run.DoesNotExist:
        raise NotFound(f"no run {run_id}", code=Code.RUN_NOT_FOUND) from None

