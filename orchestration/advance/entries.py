"""The entry points of an advance, one function per kind of change to a run: each takes what
was loaded (a snapshot) and returns what to write and send (changes), touching no database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from audit.services import Entry
from audit.verbs import ActorType, Verb
from infra.canonical import digest
from orchestration import compensation, failures, graph
from orchestration.advance.actions import approval_digest, node_of, step_action
from orchestration.advance.flow import RunAdvance
from orchestration.changes import (
    Changes,
    Fence,
    Snapshot,
)
from orchestration.definition import Node
from orchestration.errors import Code, LimitExceeded, SignalboxError
from orchestration.models import (
    Decision,
    Run,
    RunEvent,
    RunStatus,
    Step,
    StepKind,
    StepStatus,
    ToolCall,
    Wait,
    WaitKind,
)
from orchestration.registry import agent_class
from policies.evaluate import Decision as PolicyVerdict


def run_started(
    snapshot: Snapshot,
    now: datetime,
    *,
    state: Mapping[str, Any],
    input: Any,
    idempotency_key: str,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """A new run (not yet written): its input as state version 1 and its first steps."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id, insert_run=True)
    adv.record(
        Verb.RUN_SUBMITTED,
        "run",
        adv.run,
        payload=input,
        workflow=adv.wf.key,
        idempotency_key=idempotency_key,
    )
    for key, value in state.items():
        adv.write_state(key, value, writer="submit", step=None)
    try:
        adv.start()
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message)
    return adv.finish()


def step_completed(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    output: dict[str, Any],
    written: Mapping[str, Any],
    worker_id: str,
    pools: frozenset[str],
    tool_calls: list[ToolCall],
    tool_entries: list[Entry],
    tool_decisions: Sequence[PolicyVerdict] = (),
    hold_handoffs: bool,
    lease_seconds: float,
    optimistic: bool,
    fence: Fence,
) -> Changes:
    """A step's attempt succeeded with ``output``: its outputs to state, what comes next. A
    fence that ``claims`` (the step ran before its claim) records the claim first."""
    run = snapshot.run
    step.run = run
    step.status, step.output, step.finished_at = StepStatus.SUCCEEDED, output, now
    adv = RunAdvance(
        snapshot,
        now,
        actor_type=ActorType.AGENT,
        actor_id=step.agent,
        worker_id=worker_id,
        local_pools=pools,
        hold_handoffs=hold_handoffs,
        lease_seconds=lease_seconds,
        optimistic=optimistic,
    )
    adv.changes.fence = fence
    if fence.claims:
        adv.record(
            Verb.STEP_CLAIMED,
            "step",
            step,
            step=step,
            actor_type=ActorType.SYSTEM,
            actor_id=worker_id,
            attempt=step.attempt,
            worker=worker_id,
        )
    adv.changes.tool_calls.extend(tool_calls)
    adv.changes.audit.extend(tool_entries)
    for decided in tool_decisions:
        adv.note_decision(decided, step)
    adv._left(StepStatus.RUNNING)
    adv.step_event(step, "succeeded")
    node = node_of(adv.wf, step)
    try:
        if run.is_terminal or (
            run.status == RunStatus.COMPENSATING and step.kind != StepKind.COMPENSATE
        ):
            # Cancelled or failed meanwhile: the fence fails (the step was cancelled).
            return adv.changes
        if step.degraded:
            adv.note_degraded(step, step.degraded)
        if now > run.deadline_at and run.status != RunStatus.COMPENSATING:
            raise graph.run_deadline_error(run.deadline_at - run.created_at)
        adv.step_succeeded(step, node, output, written)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def attempt_failed(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    attempt_input: Any,
    error: SignalboxError,
    worker_id: str,
    tool_calls: list[ToolCall],
    tool_entries: list[Entry],
    tool_decisions: Sequence[PolicyVerdict] = (),
    payload: Any,
    delay: float,
) -> Changes:
    """A claimed attempt failed: retry it with backoff, or hand it to the next recovery tier.
    ``step`` is the step as it is now (locked), claimed by ``worker_id``."""
    adv = RunAdvance(
        snapshot, now, actor_type=ActorType.AGENT, actor_id=step.agent, worker_id=worker_id
    )
    adv.changes.tool_calls.extend(tool_calls)
    adv.changes.audit.extend(tool_entries)
    for decided in tool_decisions:
        adv.note_decision(decided, step)
    failures_now = step.failures + 1
    attempts_log = [
        *step.attempts_log,
        failures.attempt_entry(
            attempt=step.attempt, agent=step.agent, error=error, now=now, worker=worker_id
        ),
    ]
    node = node_of(adv.wf, step)
    decision = failures.attempt_failed(
        error,
        failures=failures_now,
        max_attempts=step.max_attempts,
        attempts_log=attempts_log,
        now=now,
        retry_within=adv.wf.retry_within_of(node),
        delay=delay,
    )
    try:
        if isinstance(decision, failures.Retry):
            adv.move(
                step,
                StepStatus.QUEUED,
                failures=failures_now,
                attempts_log=attempts_log,
                lease_owner="",
                lease_expires_at=None,
                available_at=now + timedelta(seconds=decision.delay),
                published_at=now,
                error_class=error.error_class,
                error_code=error.code,
                error_message=error.message,
            )
            adv.queue(step, decision.delay)
            adv.record(
                Verb.STEP_RETRY_SCHEDULED,
                "step",
                step,
                step=step,
                code=error.code,
                delay_seconds=round(decision.delay, 3),
                failures=failures_now,
            )
        else:
            step.failures, step.attempts_log = failures_now, attempts_log
            adv.changes.update_step(step, failures=failures_now, attempts_log=attempts_log)
            if step.input is None:  # the input this attempt was given, for the escalation
                step.input = attempt_input
            adv.step_exhausted(step, decision.error, payload=payload)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def lease_expired(snapshot: Snapshot, now: datetime, *, step: Step) -> Changes:
    """The worker running ``step`` stopped renewing its lease: a failed attempt (so a step that
    kills its worker every time is bounded by ``max_attempts``); queued again, or given up."""
    adv = RunAdvance(snapshot, now)
    adv.record(
        Verb.STEP_LEASE_EXPIRED,
        "step",
        step,
        step=step,
        worker=step.lease_owner,
        attempt=step.attempt,
    )
    failures_now = step.failures + 1
    error = failures.lease_expired_error(step.lease_owner)
    attempts_log = [
        *step.attempts_log,
        failures.attempt_entry(attempt=step.attempt, agent=step.agent, error=error, now=now),
    ]
    try:
        if failures_now >= step.max_attempts:
            step.failures, step.attempts_log = failures_now, attempts_log
            adv.changes.update_step(step, failures=failures_now, attempts_log=attempts_log)
            adv.step_exhausted(
                step, failures.lease_exhausted_error(failures_now, step.max_attempts)
            )
        else:
            adv.move(
                step,
                StepStatus.QUEUED,
                lease_owner="",
                lease_expires_at=None,
                available_at=now,
                published_at=now,
                failures=failures_now,
                attempts_log=attempts_log,
            )
            adv.queue(step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return adv.finish()


def approval_reopened(
    snapshot: Snapshot, now: datetime, *, step: Step, action: dict[str, Any], worker_id: str
) -> Changes:
    """What would execute differs from what was approved (or nothing was): ask again."""
    adv = RunAdvance(snapshot, now, worker_id=worker_id)
    node = adv.wf.node(step.node)
    if step.approved_digest:
        adv.record(
            Verb.APPROVAL_STALE,
            "step",
            step,
            step=step,
            payload=action,
            approved_digest=step.approved_digest,
            now_digest=digest(action),
        )
    adv.move(step, StepStatus.WAITING, lease_owner="", lease_expires_at=None, approved_digest="")
    decision = adv.policy_decide(node, action["input"])
    if decision is not None:
        adv.note_decision(decision, step)
    adv.open_approval(step, node, action, decision=decision)
    return adv.finish()


def approval_decided(
    snapshot: Snapshot,
    now: datetime,
    *,
    wait: Wait,
    step: Step,
    decision: str,
    reason: str,
    edited_input: dict[str, Any] | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator decided an approval (the wait is already closed by the caller)."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    try:
        if decision == Decision.REJECT:
            adv.record(Verb.APPROVAL_REJECTED, "wait", wait, step=step, reason=reason)
            adv.fail_step(
                step,
                SignalboxError(
                    f"approval rejected: {reason or 'no reason given'}", code=Code.APPROVAL_REJECTED
                ),
            )
            return adv.finish()
        node = adv.wf.node(step.node)
        verb = Verb.APPROVAL_APPROVED
        if decision == Decision.EDIT:
            assert edited_input is not None
            verb = Verb.APPROVAL_EDITED
            edited_decision = adv.policy_decide(node, edited_input)
            if edited_decision is not None:
                adv.note_decision(edited_decision, step)
            _apply_edit(adv, step, node, edited_input)
        approved = approval_digest(step_action(step, node, adv.run), wait.policy_version)
        adv.record(
            verb,
            "wait",
            wait,
            step=step,
            payload=edited_input,
            reason=reason,
            approved_digest=approved,
        )
        adv.move(
            step, StepStatus.QUEUED, approved_digest=approved, available_at=now, published_at=now
        )
        adv.queue(step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message, step=step)
    return adv.finish()


def _apply_edit(adv: RunAdvance, step: Step, node: Node, edited: dict[str, Any]) -> None:
    """An operator's edit becomes what the run records and what every later step sees: each
    edited field that is a state key the node reads is written as a new state version by that
    operator. Only an input built by the node's own ``input`` function (which may not map back
    onto state keys) is kept on the step instead."""
    if node.input is None and set(edited) <= node.reads:
        writer = f"operator:{adv.actor_id or 'system'}"
        for key in sorted(edited):
            if adv.run.state.get(key) != edited[key] or key not in adv.run.state:
                adv.write_state(key, edited[key], writer=writer, step=step)
        if step.input_override is not None:
            adv.changes.update_step(step, input_override=None)
            step.input_override = None
        return
    step.input_override = edited
    adv.changes.update_step(step, input_override=edited)


def wait_expired(snapshot: Snapshot, now: datetime, *, wait: Wait) -> Changes:
    """A wait's deadline passed (the caller closed it as expired): apply its declared outcome."""
    adv = RunAdvance(snapshot, now)
    step = wait.step
    adv.record(Verb.WAIT_EXPIRED, "wait", wait, step=step, outcome=wait.on_timeout, kind=wait.kind)
    try:
        _apply_timeout(adv, wait, step)
    except SignalboxError as exc:
        adv.fail_run(exc.code, exc.message)
    return adv.finish()


def _apply_timeout(adv: RunAdvance, wait: Wait, step: Step) -> None:
    node = node_of(adv.wf, step)
    if wait.kind == WaitKind.ESCALATION:
        # Nobody answered: the step fails for good (an unanswered compensation ends the run's
        # compensations, which the run's error then says).
        adv.fail_step(
            step,
            LimitExceeded(
                f"escalation {wait.pk} expired unanswered",
                code=Code.ESCALATION_EXPIRED,
                detail={"bound": "escalation_timeout", "escalation": wait.pk},
            ),
        )
        return
    if wait.kind == WaitKind.APPROVAL:
        if wait.on_timeout == "approve":
            approved = approval_digest(step_action(step, node, adv.run), wait.policy_version)
            adv.move(
                step,
                StepStatus.QUEUED,
                approved_digest=approved,
                available_at=adv.now,
                published_at=adv.now,
            )
            adv.queue(step)
            return
        adv.fail_step(
            step,
            SignalboxError(
                f"approval {wait.pk} expired unanswered (fails closed)", code=Code.APPROVAL_EXPIRED
            ),
        )
        return
    outcome = graph.event_timeout(wait.on_timeout)
    if outcome.kind == "fail":
        adv.fail_step(
            step,
            SignalboxError(f"no {wait.name!r} event before the deadline", code=Code.WAIT_TIMEOUT),
        )
        return
    timed_out = graph.timed_out_payload(wait.name)
    adv.move(step, StepStatus.SUCCEEDED, output=timed_out, finished_at=adv.now)
    adv.record(Verb.STEP_SUCCEEDED, "step", step, step=step, payload=timed_out, timed_out=True)
    if outcome.kind == "continue":
        for key in node.writes:
            adv.write_state(key, timed_out, writer=f"timeout:{wait.name}", step=step)
        adv.successors(step, node, timed_out)
    elif outcome.kind == "goto":
        adv.activate(outcome.node)


def run_cancelled(
    snapshot: Snapshot, now: datetime, *, reason: str, actor_type: str, actor_id: str
) -> Changes:
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    adv.fail_run(
        Code.CANCELLED, reason or f"cancelled by {actor_id or 'system'}", verb=Verb.RUN_CANCELLED
    )
    return adv.finish()


def run_past_deadline(snapshot: Snapshot, now: datetime) -> Changes:
    adv = RunAdvance(snapshot, now)
    # The run's own deadline: its workflow's max_duration, or the policy's run_deadline.
    allowed = adv.run.deadline_at - adv.run.created_at
    adv.record(Verb.RUN_LIMIT_HIT, "run", adv.run, bound="max_duration", limit=str(allowed))
    adv.fail_run(
        Code.RUN_DEADLINE, f"run stopped by its deadline ({allowed} after it was submitted)"
    )
    return adv.finish()


def event_received(
    snapshot: Snapshot,
    now: datetime,
    *,
    event: RunEvent,
    wait: Wait | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An outside event reached the run (``event`` is new): apply it to ``wait`` if one is open
    for it, otherwise keep it until the run waits for it."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    adv.changes.new_events.append(event)
    adv.record(
        Verb.EVENT_RECEIVED,
        "event",
        event,
        payload=event.payload,
        name=event.name,
        event_id=event.event_id,
    )
    if wait is not None:
        try:
            adv.apply_event(wait, event)
        except SignalboxError as exc:
            adv.fail_run(exc.code, exc.message)
    return adv.finish()


def escalation_resolved(
    snapshot: Snapshot,
    now: datetime,
    *,
    wait: Wait,
    step: Step,
    action: str,
    reason: str,
    output: dict[str, Any] | None,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator answered an escalation (the wait is already closed by the caller)."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    node = node_of(adv.wf, step)
    who = actor_id or "the system"
    if action == Decision.RETRY:
        is_compensation = step.kind == StepKind.COMPENSATE
        agent = step.agent if is_compensation else node.agent
        # The same budget the step had at first: a compensation's is its agent's own.
        budget = (None if is_compensation else node.max_attempts) or agent_class(agent).max_attempts
        adv.record(Verb.ESCALATION_RETRIED, "wait", wait, step=step, reason=reason, agent=agent)
        adv.move(
            step,
            StepStatus.QUEUED,
            agent=agent,
            pool=node.pool or agent_class(agent).pool,
            failures=0,
            max_attempts=adv.attempts_bound(budget or adv.wf.default_max_attempts),
            available_at=now,
            published_at=now,
            error_class="",
            error_code="",
            error_message="",
            error_detail=None,
        )
        adv.queue(step)
    elif action == Decision.SKIP:
        assert output is not None
        note = f"{compensation.SKIPPED} {who} with a supplied value" + (
            f": {reason}" if reason else ""
        )
        adv.record(Verb.ESCALATION_SKIPPED, "wait", wait, step=step, payload=output, reason=reason)
        # The failure that led here stays in the escalation's context and the attempts log.
        _succeed_with(adv, step, node, output, note, now)
    else:
        adv.record(Verb.ESCALATION_ABORTED, "wait", wait, step=step, reason=reason)
        adv.fail_step(
            step,
            SignalboxError(
                f"aborted by {who} after escalation" + (f": {reason}" if reason else ""),
                code=Code.ABORTED,
            ),
        )
    return adv.finish()


def run_retried(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    reason: str,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator retried a failed run from its failed ``step``: the run is running again, the
    step queued with its node's agent and a fresh attempt budget, and the run's deadline is as
    long again from now as it was from submission."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    node = node_of(adv.wf, step)
    run = adv.run
    budget = node.max_attempts or agent_class(node.agent).max_attempts
    adv.record(
        Verb.RUN_RETRIED,
        "run",
        run,
        step=step,
        reason=reason,
        code=run.error_code,
        message=run.error_message,
    )
    _run_reopened(run, now)
    adv.move(
        step,
        StepStatus.QUEUED,
        agent=node.agent,
        pool=node.pool or agent_class(node.agent).pool,
        failures=0,
        max_attempts=adv.attempts_bound(budget or adv.wf.default_max_attempts),
        available_at=now,
        published_at=now,
        finished_at=None,
        error_class="",
        error_code="",
        error_message="",
        error_detail=None,
    )
    adv.queue(step)
    return adv.finish()


def run_step_skipped(
    snapshot: Snapshot,
    now: datetime,
    *,
    step: Step,
    output: dict[str, Any],
    reason: str,
    actor_type: str,
    actor_id: str,
) -> Changes:
    """An operator skipped the failed ``step`` of a failed run with ``output`` (already checked
    against the step's contract): the step succeeds with it (marked degraded), the run is
    running again and goes on from there, its deadline as long again from now as at first."""
    adv = RunAdvance(snapshot, now, actor_type=actor_type, actor_id=actor_id)
    node = node_of(adv.wf, step)
    run = adv.run
    note = f"{compensation.SKIPPED} {actor_id or 'the system'} with a supplied value" + (
        f": {reason}" if reason else ""
    )
    adv.record(
        Verb.STEP_SKIPPED,
        "step",
        step,
        step=step,
        payload=output,
        reason=reason,
        code=run.error_code,
        message=run.error_message,
    )
    _run_reopened(run, now)
    _succeed_with(adv, step, node, output, note, now)
    return adv.finish()


def _succeed_with(
    adv: RunAdvance, step: Step, node: Node, output: dict[str, Any], note: str, now: datetime
) -> None:
    """A skipped step succeeds with the value a person supplied, marked degraded, and the run
    goes on from it (or fails, if that value cannot be taken further)."""
    adv.move(
        step,
        StepStatus.SUCCEEDED,
        output=output,
        finished_at=now,
        degraded=note[:500],
        error_class="",
        error_code="",
        error_message="",
        error_detail=None,
    )
    adv.note_degraded(step, note)
    try:
        adv.step_succeeded(step, node, output, {})
    except SignalboxError as exc:
        adv.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)


def _run_reopened(run: Run, now: datetime) -> None:
    """A failed run runs again from its failed step: its deadline counts from now, as long as it
    was; its error is cleared."""
    run.deadline_at = now + (run.deadline_at - run.created_at)
    run.status = RunStatus.RUNNING
    run.finished_at = None
    run.error_code = ""
    run.error_message = ""
