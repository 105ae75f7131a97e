"""Every write to runs from outside the engine: submit, cancel, decide, resolve, send an event.

Each service checks its input, owns its transaction, locks the run row, computes the advance
(``orchestration.advance``), writes it with its audit rows in one store call, and sends wake-ups
and live events only after commit (``orchestration.dispatch``): a change that committed is
reported as done, whatever the broker says. Views, API handlers, tasks and commands call these
and nothing else to change a run.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from audit.selectors import audit_event_exists
from audit.services import Entry, audit_record_many
from audit.verbs import ActorType, Verb
from infra.canonical import digest
from orchestration import advance, dispatch, runtime, selectors
from orchestration.changes import ACTIVE_STEPS, DONE_STEPS, OPEN_WAITS, Changes, Snapshot
from orchestration.commit import compute_locked, write_and_send, write_many_and_send
from orchestration.contracts import validation_errors
from orchestration.errors import (
    Code,
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SignalboxError,
)
from orchestration.graph import deadline_of
from orchestration.models import (
    DRILL_WORKFLOW,
    ESCALATION_ACTIONS,
    Decision,
    Run,
    RunEvent,
    RunStatus,
    Step,
    Wait,
    WaitClaim,
    WaitKind,
    WaitStatus,
    WaitVote,
)
from orchestration.payloads import payload_refusal, payload_size, text_refusal
from orchestration.registry import agent_class, workflow_get
from policies.active import active_policy
from policies.evaluate import policy_decide
from policies.facts import Facts
from policies.ledger import ceiling_raise
from policies.tenants import UnknownTenant, tenant_by_id, tenant_by_slug

#: What failing a run reads: its active steps, their open waits and what it may have to undo.
FAILING = frozenset({ACTIVE_STEPS, OPEN_WAITS, DONE_STEPS})


def _actor(user: User | None) -> tuple[str, str]:
    if user is None:
        return ActorType.SYSTEM, ""
    return ActorType.HUMAN, user.get_username()


def _check_payload(payload: Any, what: str) -> None:
    """A payload bound for the database: storable, and within the size limit."""
    refusal = payload_refusal(payload)
    if refusal is not None:
        raise InvalidInput(f"{what} cannot be stored: {refusal}", code=Code.UNSTORABLE_VALUE)
    size = payload_size(payload)
    limit = settings.SIGNALBOX["MAX_PAYLOAD_BYTES"]
    if size > limit:
        raise PayloadTooLarge(
            f"{what} is {size} bytes; the limit is {limit}", detail={"size": size, "limit": limit}
        )


def _check_text(value: str | None, what: str) -> None:
    refusal = text_refusal(value) if value else None
    if refusal is not None:
        raise InvalidInput(f"{what} {refusal}", code=Code.UNSTORABLE_VALUE)


def _validated(contract: type[BaseModel], payload: Any, *, code: str, message: str) -> Any:
    """``payload`` as ``contract`` normalises it, or InvalidInput (422) listing what is wrong."""
    try:
        return contract.model_validate(payload).model_dump(mode="json")
    except ValidationError as exc:
        raise InvalidInput(message, code=code, detail=validation_errors(exc)) from exc


# --- submit -----------------------------------------------------------------------------------------


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
    """Create a run and its first steps in one transaction. The same idempotency key (per
    submitter) with the same request returns the first run instead of creating a second; with a
    different request it is refused (409 ``idempotency_key_reused``), as payment APIs do."""
    wf = workflow_get(workflow, version)
    _check_payload(input, "run input")
    _check_text(tenant, "tenant")
    try:
        tenant_record = tenant_by_slug(tenant)
    except UnknownTenant:
        raise NotFound(
            f"no tenant {tenant!r}", code=Code.UNKNOWN_TENANT, detail={"tenant": tenant}
        ) from None
    if submitted_by is not None:
        selectors.submit_check(submitted_by, tenant_record)
    _check_text(idempotency_key, "idempotency key")
    state = _validated(
        wf.input,
        input,
        code=Code.INPUT_CONTRACT,
        message=f"input does not satisfy {wf.key}'s input contract",
    )
    scope = str(submitted_by.pk) if submitted_by is not None else "system"
    request = digest(
        {
            "workflow": wf.name,
            "version": version,
            "input": input,
            "priority": priority,
            "tenant": tenant_record.slug,
        }
    )
    actor_type, actor_id = _actor(submitted_by)
    now = timezone.now()
    active = active_policy()
    deadline_cap = active.bounds(wf.name).run_deadline if active is not None else None
    run = Run(
        workflow_name=wf.name,
        workflow_version=wf.version,
        status=RunStatus.QUEUED,
        priority=priority,
        tenant=tenant_record,
        submitted_by=submitted_by,
        idempotency_scope=scope,
        idempotency_key=idempotency_key or None,
        request_digest=request,
        trace_id=secrets.token_hex(16),
        seed=seed if seed is not None else secrets.randbits(48),
        input=input,
        created_at=now,
        updated_at=now,
        deadline_at=deadline_of(wf, now, deadline_cap),
    )
    rt = runtime.current()
    changes = advance.run_started(
        rt.store.new_run_snapshot(run),
        now,
        state=state,
        input=input,
        idempotency_key=idempotency_key or "",
        actor_type=actor_type,
        actor_id=actor_id,
    )
    try:
        # A key seen before is found by the unique constraint refusing the new run, rather than
        # by a lookup first, which would cost every submit for a rare case.
        rt.store.commit(changes).result()
    except IntegrityError:
        existing = (
            rt.store.run_by_idempotency_key(scope, idempotency_key) if idempotency_key else None
        )
        if existing is None:
            raise
        if existing.request_digest and existing.request_digest != request:
            raise Conflict(
                f"idempotency key {idempotency_key!r} was used for a different request (run {existing.pk})",
                code=Code.IDEMPOTENCY_KEY_REUSED,
                detail={"run": existing.pk},
            ) from None
        return Submitted(existing, created=False)
    dispatch.send_on_commit(changes, rt)
    return Submitted(run, created=True)


# --- cancel -----------------------------------------------------------------------------------------


def run_cancel(*, run_id: int, user: User | None, reason: str = "") -> Run:
    """Cancel a run that has not ended: its active steps are cancelled and its waits closed."""
    _check_text(reason, "reason")
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    rt = runtime.current()

    def compute(snapshot: Snapshot) -> Changes:
        run = snapshot.run
        if run.is_terminal:
            raise Conflict(
                f"run {run_id} already {run.status}",
                code=Code.RUN_TERMINAL,
                detail={"status": run.status},
            )
        if run.status == RunStatus.COMPENSATING:
            raise Conflict(
                f"run {run_id} already ended ({run.error_code}) and is undoing its completed steps; "
                "abort an escalated compensation to stop it",
                code=Code.RUN_COMPENSATING,
                detail={"status": run.status},
            )
        return advance.run_cancelled(
            snapshot, now, reason=reason, actor_type=actor_type, actor_id=actor_id
        )

    with transaction.atomic():
        changes = _locked_or_404(rt, run_id, compute, needs=FAILING)
        write_and_send(rt, changes)
    return changes.run


def _locked_or_404(rt: runtime.Runtime, run_id: int, compute: Any, **kwargs: Any) -> Changes:
    try:
        return compute_locked(rt, run_id, compute, **kwargs)
    except Run.DoesNotExist:
        raise NotFound(f"no run {run_id}", code=Code.RUN_NOT_FOUND) from None


# --- approvals --------------------------------------------------------------------------------------


def approval_decide(
    *,
    wait_id: int,
    user: User | None,
    decision: str,
    reason: str = "",
    edited_input: dict[str, Any] | None = None,
    run_id: int | None = None,
    read: Wait | None = None,
) -> Wait:
    """Apply an operator's decision to an open approval. Exactly one decision wins; a second
    one (or one on an expired or stale approval) raises Conflict. An edit becomes what the run
    records: the edited fields are new state versions written by the deciding person.
    ``read`` is the approval as the caller just read it with its run and step (not read again:
    the conditional close below is what decides whether it was still open)."""
    if decision not in Decision.values:
        raise InvalidInput(
            f"decision must be one of {', '.join(Decision.values)}", code=Code.INVALID_DECISION
        )
    if decision == Decision.EDIT and edited_input is None:
        raise InvalidInput("edit-then-approve needs edited_input", code=Code.EDITED_INPUT_MISSING)
    if decision != Decision.EDIT and edited_input is not None:
        raise InvalidInput(
            "edited_input is only accepted with decision 'edit'", code=Code.EDITED_INPUT_UNEXPECTED
        )
    _check_text(reason, "reason")
    rt = runtime.current()
    if read is not None and read.pk == wait_id and read.kind == WaitKind.APPROVAL:
        wait: Wait | None = read
    else:
        wait = rt.store.wait_get(wait_id, kind=WaitKind.APPROVAL)
    if wait is None or (run_id is not None and wait.run_id != run_id):
        raise NotFound(f"no approval {wait_id}", code=Code.APPROVAL_NOT_FOUND)
    if decision == Decision.EDIT:
        assert edited_input is not None
        _check_payload(edited_input, "edited input")
        edited_input = _validated(
            agent_class(wait.step.agent).Input,
            edited_input,
            code=Code.INPUT_CONTRACT,
            message=f"edited input does not satisfy {wait.step.agent!r}'s input contract",
        )
    now = timezone.now()
    if decision == Decision.EDIT and user is not None:
        assert edited_input is not None
        _edit_check(wait, user, edited_input, now)
    if user is not None:
        # Before the transaction: a refusal's audit record must not roll back with it.
        selectors.wait_check_decide(user, wait)
    with transaction.atomic():
        changes = _approval_close_and_compute(
            rt,
            wait,
            user,
            decision=decision,
            reason=reason,
            edited_input=edited_input,
            now=now,
        )
        if changes is None:
            return wait  # more approvals are needed
        write_and_send(rt, changes)
    return wait


def _approval_close_and_compute(
    rt: runtime.Runtime,
    wait: Wait,
    user: User | None,
    *,
    decision: str,
    reason: str,
    edited_input: dict[str, Any] | None,
    now: datetime,
) -> Changes | None:
    """Inside the caller's transaction: close the approval with the decision (its run locked
    and the step that waits on it read by the same statement, ``Store.wait_close_locked``) and
    compute what the run does next, not written yet. ``None``: the vote was recorded and more
    approvals are needed. Conflict when it is no longer open. Afterwards ``wait`` is the row as
    decided, with its run and step as the changes leave them."""
    actor_type, actor_id = _actor(user)
    if decision != Decision.REJECT and (wait.quorum > 1 or wait.stage + 1 < len(wait.stages)):
        if decision == Decision.EDIT:
            raise Conflict(
                f"approval {wait.pk} needs {wait.quorum} people at each of its stages: an edit by "
                "one of them would bypass the others; reject it with the change you want, or "
                "approve it as proposed",
                code=Code.EDIT_NEEDS_SINGLE_APPROVAL,
            )
        rt.store.run_get(wait.run_id, lock=True)  # votes are counted under the run's lock
        if not _vote(rt, wait, user, reason, now):
            return None
    decided: dict[str, Any] = dict(
        status=WaitStatus.REJECTED if decision == Decision.REJECT else WaitStatus.APPROVED,
        decision=decision,
        decided_by=user,
        decided_at=now,
        decision_reason=reason,
        edited_input=edited_input,
    )
    locked, step = rt.store.wait_close_locked(wait.run_id, wait.pk, wait.step_id, **decided)
    if step is None:
        raise _already_decided(rt, wait.pk, "approval")
    # The row is now what was read before plus what this update wrote: nothing else changes
    # an open wait, and it was open.
    for field, value in decided.items():
        setattr(wait, field, value)

    def compute(snapshot: Snapshot) -> Changes:
        focus = snapshot.focus
        assert focus is not None
        return advance.approval_decided(
            snapshot,
            now,
            wait=wait,
            step=focus,
            decision=decision,
            reason=reason,
            edited_input=edited_input,
            actor_type=actor_type,
            actor_id=actor_id,
        )

    needs = FAILING if decision == Decision.REJECT else frozenset()
    changes = compute_locked(rt, wait.run_id, compute, needs=needs, focus=step, locked=locked)
    wait.run, wait.step = changes.run, step  # as they are now, for whoever shows it
    return changes


def _edit_check(wait: Wait, user: User, edited_input: dict[str, Any], now: datetime) -> None:
    """An edit is checked against the policy as well as the contract: what the edited action
    would need must be within what this person may approve alone."""
    active = active_policy()
    if active is None:
        return
    run = wait.run
    tenant = tenant_by_id(run.tenant_id)
    node = workflow_get(run.workflow_name, run.workflow_version).node(wait.step.node)
    facts = Facts(
        action=f"agent:{node.agent}",
        workflow=run.workflow_name,
        node=node.name,
        tenant=tenant.slug,
        tenant_time_zone=tenant.time_zone,
        agent=node.agent,
        params=edited_input,
        run_id=run.pk,
    )
    verdict = policy_decide(active.compiled, facts, now)
    if verdict.outcome == "deny":
        raise Conflict(
            f"the edited action is not allowed by policy v{active.number} ({verdict.rule}): {verdict.reason}",
            code=Code.EDIT_DENIED_BY_POLICY,
            detail={"rule": verdict.rule, "version": active.number},
        )
    if verdict.outcome != "require_approval":
        return
    needed = max(verdict.stages or (verdict.tier,))
    held = selectors.user_tier(user)
    people = max(verdict.quorum or 1, 1) * max(len(verdict.stages), 1)
    if needed > held or people > 1:
        who = f"tier {needed}" + (f", {people} different people" if people > 1 else "")
        raise PermissionDenied(
            f"the edited action needs {who} under policy v{active.number} ({verdict.rule}: {verdict.reason}); "
            f"you hold tier {held}. Reject it with the change you want, or ask someone who can approve it",
            code=Code.EDIT_NEEDS_HIGHER_TIER,
            detail={
                "required_tier": needed,
                "your_tier": held,
                "people": people,
                "rule": verdict.rule,
            },
        )


def _wait_entry(
    verb: Verb, wait: Wait, actor_type: str, actor_id: str, data: dict[str, Any]
) -> Entry:
    """An audit entry about ``wait`` (its run, step and trace) by an actor."""
    return Entry(
        verb=verb,
        object_type="wait",
        object_id=wait.pk,
        actor_type=actor_type,
        actor_id=actor_id,
        run_id=wait.run_id,
        step_id=wait.step_id,
        trace_id=wait.run.trace_id,
        data=data,
    )


def _vote(rt: runtime.Runtime, wait: Wait, user: User | None, reason: str, now: datetime) -> bool:
    """Record ``user``'s approval of ``wait`` (the run is locked): True when it completes the
    last stage's quorum (the caller then closes the wait), False when more people must approve.
    A vote counts for the exact action it was cast on; each person votes once."""
    current = rt.store.wait_get(wait.pk)
    if current is None or current.status != WaitStatus.OPEN:
        raise _already_decided(rt, wait.pk, "approval")
    if user is None:
        return True  # the system (an expiry's declared outcome) does not need a quorum
    try:
        with transaction.atomic():
            WaitVote.objects.create(
                wait=current,
                user=user,
                stage=current.stage,
                action_digest=current.action_digest,
                reason=reason,
                created_at=now,
            )
    except IntegrityError:
        raise Conflict(
            f"you already approved approval {wait.pk}: it needs {current.quorum} different people",
            code=Code.ALREADY_VOTED,
        ) from None
    votes = WaitVote.objects.filter(
        wait=current, stage=current.stage, action_digest=current.action_digest
    ).count()
    stages = current.stages or [current.tier]
    if votes >= current.quorum and current.stage + 1 >= len(stages):
        return True
    fields: dict[str, Any] = {}
    if votes >= current.quorum:  # this stage is signed off: the next stage's tier decides now
        fields = {"stage": current.stage + 1, "tier": stages[current.stage + 1]}
        Wait.objects.filter(pk=wait.pk, status=WaitStatus.OPEN).update(**fields)
    for name, value in fields.items():
        setattr(wait, name, value)
    audit_record_many(
        [
            _wait_entry(
                Verb.APPROVAL_VOTED,
                wait,
                ActorType.HUMAN,
                user.get_username(),
                {
                    "stage": current.stage,
                    "votes": votes,
                    "quorum": current.quorum,
                    "reason": reason,
                    "next_stage_tier": fields.get("tier"),
                },
            )
        ],
        now=now,
    )
    return False


def _already_decided(rt: runtime.Runtime, wait_id: int, what: str) -> Conflict:
    current = rt.store.wait_get(wait_id)
    assert current is not None
    by = current.decided_by.get_username() if current.decided_by else "the system"
    when = f" at {current.decided_at:%Y-%m-%d %H:%M:%S} UTC" if current.decided_at else ""
    how = f"{current.decision} by {by}" if current.decision else f"{current.status} by {by}"
    return Conflict(
        f"{what} {wait_id} is already {current.status} ({how}{when})",
        code=Code.ALREADY_DECIDED,
        detail={
            "status": current.status,
            "decision": current.decision,
            "decided_by": by,
            "decided_at": current.decided_at.isoformat() if current.decided_at else None,
        },
    )


# --- escalations ------------------------------------------------------------------------------------


def escalation_raise_ceiling(
    *, wait_id: int, user: User, new_limit: Decimal, reason: str, run_id: int | None = None
) -> Wait:
    """Answer an escalation that stopped at its run's own cost ceiling: raise that ceiling to
    ``new_limit``, then retry the step. The raise is ``policies.ledger.ceiling_raise`` (tier 2
    or higher, a reason, only ever up, audited) and commits first; the retry is then an
    ordinary answer to the escalation, so if someone answered it meanwhile this raises Conflict
    (``already_decided``) and the run keeps its raised ceiling. A shared ceiling (a workflow's
    day, a tenant's month, the global day) is not raised from here: retry once it has room,
    skip or abort."""
    _check_text(reason, "reason")
    if not reason.strip():
        raise InvalidInput("say why the ceiling is raised", code=Code.REASON_REQUIRED)
    rt = runtime.current()
    wait = rt.store.wait_get(wait_id, kind=WaitKind.ESCALATION)
    if wait is None or (run_id is not None and wait.run_id != run_id):
        raise NotFound(f"no escalation {wait_id}", code=Code.ESCALATION_NOT_FOUND)
    if wait.status != WaitStatus.OPEN:
        raise _already_decided(rt, wait_id, "escalation")
    hit = selectors.wait_ceiling_hit(wait)
    if hit is None:
        raise InvalidInput(
            "this escalation did not stop at a cost ceiling: retry, skip or abort it",
            code=Code.INVALID_ACTION,
            detail={"action": "raise_ceiling"},
        )
    if hit.get("kind") != "run":
        raise InvalidInput(
            f"this escalation stopped at a shared ceiling ({hit.get('kind')} {hit.get('key') or ''}"
            "), not at its run's own: retry it once that ceiling has room, or skip or abort it",
            code=Code.INVALID_ACTION,
            detail={"action": "raise_ceiling", "scope": hit.get("kind")},
        )
    selectors.wait_check_decide(user, wait)
    ceiling_raise(run_id=wait.run_id, new_limit=new_limit, user=user, reason=reason)
    return escalation_resolve(
        wait_id=wait_id, user=user, action=Decision.RETRY, reason=reason, run_id=wait.run_id
    )


def escalation_resolve(
    *,
    wait_id: int,
    user: User | None,
    action: str,
    reason: str = "",
    output: dict[str, Any] | None = None,
    run_id: int | None = None,
) -> Wait:
    """An operator's answer to an escalated step:

    * ``retry``: the step runs again with its node's agent and a fresh attempt budget;
    * ``skip``: the step succeeds with ``output``, checked against the step's output contract,
      and the run goes on (marked degraded);
    * ``abort``: the step fails and the run with it (completed side effects are compensated;
      on a compensation, the remaining compensations are stopped).

    Exactly one answer wins; another raises Conflict (409 ``already_decided``)."""
    if action not in ESCALATION_ACTIONS:
        raise InvalidInput(
            f"action must be one of {', '.join(ESCALATION_ACTIONS)}",
            code=Code.INVALID_ACTION,
            detail={"action": action},
        )
    if action == Decision.SKIP and output is None:
        raise InvalidInput(
            "skip needs output: the value the step should have produced", code=Code.OUTPUT_MISSING
        )
    if action != Decision.SKIP and output is not None:
        raise InvalidInput(
            "output is only accepted with action 'skip'", code=Code.OUTPUT_UNEXPECTED
        )
    _check_text(reason, "reason")
    rt = runtime.current()
    wait = rt.store.wait_get(wait_id, kind=WaitKind.ESCALATION)
    if wait is None or (run_id is not None and wait.run_id != run_id):
        raise NotFound(f"no escalation {wait_id}", code=Code.ESCALATION_NOT_FOUND)
    if wait.status != WaitStatus.OPEN:
        raise _already_decided(
            rt, wait_id, "escalation"
        )  # before judging the value: it could not apply anyway
    if output is not None:
        _check_payload(output, "skip output")
        wf = workflow_get(wait.run.workflow_name, wait.run.workflow_version)
        contract = advance.output_contract(wait.step, advance.node_of(wf, wait.step))
        output = _validated(
            contract,
            output,
            code=Code.OUTPUT_CONTRACT,
            message=f"the skip value does not satisfy {contract.__name__}, the output contract of {wait.step.key!r}",
        )
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    closed: dict[str, Any] = dict(
        status=WaitStatus.RESOLVED,
        decision=action,
        decided_by=user,
        decided_at=now,
        decision_reason=reason,
        payload=output,
    )
    if user is not None:
        # Before the transaction: a refusal's audit record must not roll back with it.
        selectors.wait_check_decide(user, wait)
    with transaction.atomic():
        locked = rt.store.run_get(wait.run_id, lock=True)
        if not rt.store.wait_close(wait_id, **closed):
            raise _already_decided(rt, wait_id, "escalation")
        for field, value in closed.items():
            setattr(wait, field, value)
        audit_record_many(
            drill_acknowledged_entries(wait, actor_type, actor_id, now, how=action), now=now
        )

        def compute(snapshot: Snapshot) -> Changes:
            step = snapshot.focus
            assert step is not None
            return advance.escalation_resolved(
                snapshot,
                now,
                wait=wait,
                step=step,
                action=action,
                reason=reason,
                output=output,
                actor_type=actor_type,
                actor_id=actor_id,
            )

        needs = FAILING if action == Decision.ABORT else frozenset()
        # The run as locked above: nothing has written it since (only the wait and audit rows).
        changes = compute_locked(
            rt, wait.run_id, compute, needs=needs, focus_id=wait.step_id, locked=locked
        )
        write_and_send(rt, changes)
    return wait


# --- outside events ---------------------------------------------------------------------------------


@dataclass
class EventDelivery:
    event: RunEvent
    #: The event reached a waiting step now (otherwise it is kept until the run waits for it).
    applied: bool
    #: This ``event_id`` was received before, with the same name and payload; nothing changed.
    duplicate: bool


def run_send_event(
    *, run_id: int, name: str, event_id: str, payload: dict[str, Any], user: User | None
) -> EventDelivery:
    """Deliver a named outside event to a run, once: the same ``event_id`` sent again with the
    same name and payload is a no-op that returns the first delivery with ``duplicate`` set; with
    a different one it is refused (409 ``event_id_reused``)."""
    _check_payload(payload, "event payload")
    _check_text(name, "event name")
    _check_text(event_id, "event id")
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    rt = runtime.current()
    outcome: dict[str, Any] = {}

    def compute(snapshot: Snapshot) -> Changes:
        run = snapshot.run
        existing = rt.store.event_get(run, event_id)
        if existing is not None:
            outcome["duplicate"] = existing
            raise _Duplicate
        if run.is_terminal:
            raise Conflict(
                f"run {run_id} already {run.status}",
                code=Code.RUN_TERMINAL,
                detail={"status": run.status},
            )
        event = RunEvent(run=run, name=name, event_id=event_id, payload=payload, received_at=now)
        wait = rt.store.open_event_wait(run, name)
        if wait is not None:
            wait.step = snapshot.adopt(wait.step)
        outcome["event"], outcome["applied"] = event, wait is not None
        return advance.event_received(
            snapshot, now, event=event, wait=wait, actor_type=actor_type, actor_id=actor_id
        )

    try:
        with transaction.atomic():
            changes = _locked_or_404(rt, run_id, compute)
            write_and_send(rt, changes)
    except _Duplicate:
        first: RunEvent = outcome["duplicate"]
        if first.name != name or first.payload != payload:
            raise Conflict(
                f"event id {event_id!r} was already used for a different event ({first.name!r})",
                code=Code.EVENT_ID_REUSED,
                detail={"event_id": event_id},
            ) from None
        return EventDelivery(first, applied=False, duplicate=True)
    return EventDelivery(outcome["event"], applied=outcome["applied"], duplicate=False)


class _Duplicate(Exception):
    """The event id was seen before: nothing is written."""


SLA_MAX_TIER = selectors.SLA_MAX_TIER
sla_period = selectors.sla_period


def waits_escalate_breached(now: datetime | None = None, *, limit: int = 200) -> list[int]:
    """Escalate every open approval and escalation whose SLA has breached to the next tier (at
    most tier 3) and restart its SLA. Each row is claimed by a conditional UPDATE on the values
    read, so two schedulers scanning at once escalate an item once. Returns the waits escalated."""
    now = now or timezone.now()
    period = sla_period()
    breached = (
        Wait.objects.filter(
            status=WaitStatus.OPEN,
            kind__in=[WaitKind.APPROVAL, WaitKind.ESCALATION],
            tier__lt=SLA_MAX_TIER,
        )
        .filter(Q(sla_due_at__lte=now) | Q(sla_due_at__isnull=True, created_at__lte=now - period))
        .order_by("pk")
        .values_list(
            "pk", "tier", "sla_due_at", "sla_breaches", "run_id", "step_id", "run__trace_id"
        )[:limit]
    )
    escalated: list[int] = []
    for pk, tier, due, breaches, run_id, step_id, trace_id in breached:
        with transaction.atomic():
            claimed = Wait.objects.filter(
                pk=pk, status=WaitStatus.OPEN, tier=tier, sla_breaches=breaches
            ).update(tier=tier + 1, sla_due_at=now + period, sla_breaches=breaches + 1)
            if not claimed:
                continue  # decided, or escalated by another scheduler, since it was read
            audit_record_many(
                [
                    Entry(
                        verb=Verb.WAIT_SLA_BREACHED,
                        object_type="wait",
                        object_id=pk,
                        run_id=run_id,
                        step_id=step_id,
                        trace_id=trace_id,
                        data={
                            "from_tier": tier,
                            "to_tier": tier + 1,
                            "due_at": due.isoformat() if due else None,
                            "next_due_at": (now + period).isoformat(),
                        },
                    )
                ],
                now=now,
            )
        escalated.append(pk)
    return escalated


# --- escalation drills ------------------------------------------------------------------------------


def drill_fire(*, user: User | None, tier: int, tenant: str = "", note: str = "") -> Run:
    """Fire an escalation drill: a run of the ``drill`` workflow whose step escalates at once at
    ``tier`` on ``tenant``, through the real engine (inbox, SLA, notifications). Audited
    DRILL_FIRED in the submission's transaction."""
    if user is not None:
        selectors.drill_fire_check(user)
    if not isinstance(tier, int) or isinstance(tier, bool) or not 1 <= tier <= SLA_MAX_TIER:
        raise InvalidInput(
            "tier must be 1, 2 or 3", code=Code.INPUT_CONTRACT, detail={"tier": tier}
        )
    _check_text(note, "note")
    actor_type, actor_id = _actor(user)
    with transaction.atomic():
        run = run_submit(
            workflow=DRILL_WORKFLOW, input={"tier": tier, "note": note}, tenant=tenant
        ).run
        audit_record_many(
            [
                Entry(
                    verb=Verb.DRILL_FIRED,
                    object_type="run",
                    object_id=run.pk,
                    actor_type=actor_type,
                    actor_id=actor_id,
                    run_id=run.pk,
                    trace_id=run.trace_id,
                    data={"tier": tier, "tenant": tenant, "note": note},
                )
            ]
        )
    return run


def drill_acknowledged_entries(
    wait: Wait, actor_type: str, actor_id: str, now: datetime, *, how: str
) -> list[Entry]:
    """The DRILL_ACKNOWLEDGED event (with the seconds since the drill's item opened) when
    ``wait`` is a drill's escalation answered or claimed now; nothing for a real item. For the
    caller's transaction: deciding calls it, and so does claiming. Only the first counts: a
    drill claimed, then answered, was acknowledged when it was claimed."""
    if not wait.run.is_drill or audit_event_exists(Verb.DRILL_ACKNOWLEDGED, "wait", wait.pk):
        return []
    seconds = round((now - wait.created_at).total_seconds(), 3)
    return [
        _wait_entry(
            Verb.DRILL_ACKNOWLEDGED,
            wait,
            actor_type,
            actor_id,
            {"seconds": seconds, "how": how, "tier": wait.tier},
        )
    ]


# --- claims and bulk decisions (the inbox) ------------------------------------------------------------

#: How long a claim on an approval or escalation lasts unless renewed or released.
CLAIM_MINUTES = 15


def _decidable_wait(user: User, wait_id: int) -> Wait:
    wait = (
        Wait.objects.filter(
            pk=wait_id,
            kind__in=(WaitKind.APPROVAL, WaitKind.ESCALATION),
            run__in=selectors.runs_visible_to(user),
        )
        .select_related("run", "step")
        .first()
    )
    if wait is None:
        raise NotFound(f"no approval or escalation {wait_id}", code=Code.WAIT_NOT_FOUND)
    return wait


def _send_claim_changed(wait: Wait, *, claimed_by: str, until: datetime | None) -> None:
    """After commit, tell the inbox and the item's page (the run's group) who holds it now."""
    event = {
        "run_id": wait.run_id,
        "kind": "claim",
        "wait_id": wait.pk,
        "claimed_by": claimed_by,
        "until": until.isoformat() if until is not None else None,
    }
    rt = runtime.current()
    transaction.on_commit(lambda: rt.live.send([event]))


def wait_claim(*, wait_id: int, user: User, minutes: int = CLAIM_MINUTES) -> WaitClaim:
    """Claim an open approval or escalation for ``minutes`` (renewing one's own claim). Someone
    else's live claim is a Conflict saying who holds it and until when."""
    wait = _decidable_wait(user, wait_id)
    selectors.wait_check_decide(user, wait)
    now = timezone.now()
    with transaction.atomic():
        locked = Wait.objects.select_for_update().get(pk=wait.pk)
        if locked.status != WaitStatus.OPEN:
            raise Conflict(
                f"{wait.kind} {wait_id} is already {locked.status}", code=Code.WAIT_NOT_OPEN
            )
        current = WaitClaim.objects.filter(wait=locked).select_related("user").first()
        if current is not None and current.expires_at > now and current.user_id != user.pk:
            raise Conflict(
                f"claimed by {current.user.get_username()} until {current.expires_at:%H:%M:%S} UTC",
                code=Code.CLAIMED_BY_SOMEONE_ELSE,
                detail={
                    "claimed_by": current.user.get_username(),
                    "until": current.expires_at.isoformat(),
                },
            )
        claim, _ = WaitClaim.objects.update_or_create(
            wait=locked,
            defaults={
                "user": user,
                "claimed_at": now,
                "expires_at": now + timedelta(minutes=minutes),
            },
        )
        audit_record_many(
            [
                _wait_entry(
                    Verb.WAIT_CLAIMED,
                    wait,
                    ActorType.HUMAN,
                    user.get_username(),
                    {"until": claim.expires_at.isoformat(), "kind": wait.kind},
                ),
                *drill_acknowledged_entries(
                    wait, ActorType.HUMAN, user.get_username(), now, how="claim"
                ),
            ],
            now=now,
        )
        _send_claim_changed(wait, claimed_by=user.get_username(), until=claim.expires_at)
    return claim


def wait_release(*, wait_id: int, user: User) -> None:
    """Give up one's claim (someone else's claim is not theirs to release)."""
    wait = _decidable_wait(user, wait_id)
    now = timezone.now()
    with transaction.atomic():
        deleted, _ = WaitClaim.objects.filter(wait_id=wait.pk, user=user).delete()
        if deleted:
            audit_record_many(
                [
                    _wait_entry(
                        Verb.WAIT_RELEASED,
                        wait,
                        ActorType.HUMAN,
                        user.get_username(),
                        {"kind": wait.kind},
                    )
                ],
                now=now,
            )
            _send_claim_changed(wait, claimed_by="", until=None)


@dataclass
class BulkOutcome:
    wait_id: int
    ok: bool
    message: str = ""
    code: str = ""


def approvals_decide_bulk(
    *, wait_ids: list[int], user: User, decision: str = Decision.APPROVE, reason: str = ""
) -> list[BulkOutcome]:
    """Approve (or reject) several approvals of the same tier with one reason, in one
    transaction: each is closed under its run's lock, in run order (two bulk decisions over the
    same runs lock them in the same order, so neither waits for the other forever), and what
    they change is written in one store call at the end. A refusal (not found, not allowed,
    already decided) is that approval's outcome and leaves the others decided; the outcome of
    each is reported, in the order asked. Edits are not offered in bulk."""
    if decision not in (Decision.APPROVE, Decision.REJECT):
        raise InvalidInput("bulk decisions are approve or reject", code=Code.INVALID_DECISION)
    if not wait_ids:
        raise InvalidInput("choose at least one approval", code=Code.INVALID_DECISION)
    _check_text(reason, "reason")
    visible = selectors.approvals_visible_to(user, wait_ids)
    tiers = {wait.tier for wait in visible.values()}
    if len(tiers) > 1:
        raise InvalidInput(
            "bulk decisions are for approvals of one tier",
            code=Code.INVALID_DECISION,
            detail={"tiers": sorted(tiers)},
        )
    asked = list(dict.fromkeys(wait_ids))
    outcomes: dict[int, BulkOutcome] = {}
    allowed: list[Wait] = []
    for wait_id in asked:
        wait = visible.get(wait_id)
        if wait is None:
            outcomes[wait_id] = BulkOutcome(
                wait_id, False, f"no approval {wait_id}", str(Code.APPROVAL_NOT_FOUND)
            )
            continue
        try:
            # Before the transaction: a refusal's audit record must not roll back with it.
            selectors.wait_check_decide(user, wait)
        except SignalboxError as exc:
            outcomes[wait_id] = BulkOutcome(wait_id, False, exc.message, str(exc.code))
        else:
            allowed.append(wait)
    rt = runtime.current()
    now = timezone.now()
    with transaction.atomic():
        unwritten: list[Changes] = []
        for wait in sorted(allowed, key=lambda w: (w.run_id, w.pk)):
            if any(changes.run.pk == wait.run_id for changes in unwritten):
                # Another approval of this run was decided above: what it changed is written
                # first, so that this one is decided from the run as that left it.
                write_many_and_send(rt, unwritten)
                unwritten = []
            try:
                changes = _approval_close_and_compute(
                    rt, wait, user, decision=decision, reason=reason, edited_input=None, now=now
                )
            except SignalboxError as exc:  # nothing was written for it
                outcomes[wait.pk] = BulkOutcome(wait.pk, False, exc.message, str(exc.code))
                continue
            outcomes[wait.pk] = BulkOutcome(wait.pk, True)
            if changes is not None:
                unwritten.append(changes)
        write_many_and_send(rt, unwritten)
    return [outcomes[wait_id] for wait_id in asked]


# --- retrying a failed run --------------------------------------------------------------------------


def _decide_check_first(user: User | None, run_id: int) -> None:
    """May ``user`` act on the run? Checked before the transaction, so that a refusal's audit
    record does not roll back with it."""
    if user is None:
        return
    found = Run.objects.filter(pk=run_id).first()
    if found is None:
        raise NotFound(f"no run {run_id}", code=Code.RUN_NOT_FOUND)
    selectors.run_check_decide(user, found)


def _failed_step_locked(rt: runtime.Runtime, run_id: int, *, only: str, cannot: str) -> Step:
    """The failed step of a failed run (its run locked, as ``step.run``): 409
    ``run_not_failed`` (``only`` says why) or ``run_not_retryable`` (``cannot`` says why)."""
    try:
        run = rt.store.run_get(run_id, lock=True)
    except Run.DoesNotExist:
        raise NotFound(f"no run {run_id}", code=Code.RUN_NOT_FOUND) from None
    if run.status != RunStatus.FAILED:
        raise Conflict(
            f"run {run_id} is {run.status}: {only}",
            code=Code.RUN_NOT_FAILED,
            detail={"status": run.status},
        )
    step, why = selectors.run_retry_point(run)
    if step is None:
        raise Conflict(
            f"run {run_id} {cannot}: {why}",
            code=Code.RUN_NOT_RETRYABLE,
            detail={"status": run.status},
        )
    step.run = run
    return step


def run_retry(*, run_id: int, user: User | None, reason: str) -> Run:
    """Retry a failed run from its failed step: the run runs again from there, the step with a
    fresh attempt budget (audited ``run.retried_from_step``). Only a failed run can be retried
    (409 ``run_not_failed``), and only one that failed at one step with nothing cancelled or
    undone by its failure (409 ``run_not_retryable``); a second click finds it running."""
    _check_text(reason, "reason")
    if not reason.strip():
        raise InvalidInput("say why the run is retried", code=Code.REASON_REQUIRED)
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    rt = runtime.current()
    _decide_check_first(user, run_id)
    with transaction.atomic():
        step = _failed_step_locked(
            rt,
            run_id,
            only="only a failed run can be retried",
            cannot="cannot be retried from a failed step",
        )

        def compute(snapshot: Snapshot) -> Changes:
            focus = snapshot.focus
            assert focus is not None
            return advance.run_retried(
                snapshot, now, step=focus, reason=reason, actor_type=actor_type, actor_id=actor_id
            )

        changes = compute_locked(rt, run_id, compute, focus_id=step.pk)
        write_and_send(rt, changes)
    return changes.run


def run_skip_failed_step(
    *, run_id: int, user: User | None, reason: str, output: dict[str, Any]
) -> Run:
    """Skip the failed step of a failed run with ``output``, the value it should have produced
    (checked against its output contract, 422 ``output_contract``): the step succeeds with it,
    marked degraded, and the run goes on from there (audited ``step.skipped``). The same runs
    as for a retry: a failed run (409 ``run_not_failed``) that failed at one step with nothing
    cancelled or undone (409 ``run_not_retryable``)."""
    _check_text(reason, "reason")
    if not reason.strip():
        raise InvalidInput("say why the step is skipped", code=Code.REASON_REQUIRED)
    _check_payload(output, "skip output")
    actor_type, actor_id = _actor(user)
    now = timezone.now()
    rt = runtime.current()
    _decide_check_first(user, run_id)
    with transaction.atomic():
        step = _failed_step_locked(
            rt,
            run_id,
            only="only a failed run's failed step can be skipped",
            cannot="cannot go on from a failed step",
        )
        run = step.run
        wf = workflow_get(run.workflow_name, run.workflow_version)
        contract = advance.output_contract(step, advance.node_of(wf, step))
        checked = _validated(
            contract,
            output,
            code=Code.OUTPUT_CONTRACT,
            message=f"the skip value does not satisfy {contract.__name__}, the output contract of {step.key!r}",
        )

        def compute(snapshot: Snapshot) -> Changes:
            focus = snapshot.focus
            assert focus is not None
            return advance.run_step_skipped(
                snapshot,
                now,
                step=focus,
                output=checked,
                reason=reason,
                actor_type=actor_type,
                actor_id=actor_id,
            )

        changes = compute_locked(rt, run_id, compute, focus_id=step.pk)
        write_and_send(rt, changes)
    return changes.run
