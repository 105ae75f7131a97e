"""The worker side: claim a step, run its agent outside any transaction, commit the outcome.

The hot path of a step is two short transactions: the claim (a conditional UPDATE) and the
completion, which also advances the run and, when this worker serves the next step's pool,
claims that step too so it runs right away without a broker round trip. The completions of one
worker's chain of steps go out without waiting for their answers (``orchestration.chain``).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from audit.verbs import ActorType, Verb
from infra.sql import Batch, db, is_postgres, pipeline, refusing_queries
from orchestration import live, store
from orchestration.agents.base import AgentContext, StateView
from orchestration.chain import (
    Chain,
    Completion,
    Member,
    Superseded,
    claim_events,
    note_handoff,
    withdraw_message,
)
from orchestration.engine import (
    NeedsTransaction,
    Tx,
    digest,
    node_of,
    output_contract,
    run_lock,
    step_action,
    step_input,
)
from orchestration.errors import (
    Code,
    ContractViolation,
    ErrorClass,
    LimitExceeded,
    SignalboxError,
    TransientError,
)
from orchestration.handoff import held_messages
from orchestration.leases import interrupt_after, lease_keeper
from orchestration.models import Run, RunStatus, Step, StepKind, StepStatus
from orchestration.registry import agent_instance, workflow_get

log = logging.getLogger(__name__)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


# --- claiming ---------------------------------------------------------------------------------


def step_claim(step_id: int, worker_id: str) -> Step | None:
    """Take a queued, due step with a lease; ``None`` when someone else has it or it is not due."""
    now = timezone.now()
    lease_until = now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
    # On PostgreSQL the claim is a single statement (its own transaction); elsewhere a short one.
    atomic = transaction.atomic() if not is_postgres() else nullcontext()
    with atomic:
        step = store.claim_step(step_id, worker_id, now, lease_until)
        if step is None:
            return None
        live.send_on_commit(claim_events(step, now))
    return step


# --- tools -----------------------------------------------------------------------------------


class StepTools:
    """A step's door to the tool registry: fills in run, step, node key and call index, so a
    retried or re-claimed step reuses its idempotency keys. The client is made on first use."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.calls = 0
        self._client: Any = None

    def call(self, capability: str, params: Any) -> Any:
        from orchestration.tools.client import ToolClient

        if self._client is None:
            self._client = ToolClient(actor_id=self.step.agent)
        self.calls += 1
        run = self.step.run
        return self._client.call(
            capability, params, run_id=run.pk, step_id=self.step.pk, node=self.step.key,
            call_index=self.calls, trace_id=run.trace_id,
        )

    def take_records(self) -> tuple[list[Any], list[Any]]:
        """The ToolCall rows and audit entries to write in the step's own transaction."""
        if self._client is None:
            return [], []
        records, entries = self._client.records, self._client.audit_entries
        self._client.records, self._client.audit_entries = [], []
        return records, entries


# --- running ----------------------------------------------------------------------------------


def _commit_failed(done: Completion, exc: BaseException, worker_id: str, pools: frozenset[str]) -> None:
    """Committing a successful attempt failed (the database is gone, a bug): the attempt is
    recorded as a transient failure, so it is retried, then bounded by its limits."""
    log.error("committing step %s failed", done.step.pk, exc_info=exc)
    close_old_connections()
    _fail(done.step, TransientError(f"committing the result failed: {exc!r}", code=Code.COMMIT_FAILED),
          worker_id, pools, records=done.records)


def step_execute(step_id: int, *, worker_id: str, pools: frozenset[str]) -> int:
    """Claim and run ``step_id``, then any successor this worker claimed locally.

    Returns how many steps ran to an outcome. Safe to call with a stale or duplicate message:
    the claim decides, and a step that is not queued is left alone. When the local chain ends,
    steps of the same run that were handed to the broker for this worker's pools are claimed
    here if no other worker has taken them yet. Their wake-up messages are held back meanwhile
    (``orchestration.handoff``): one that went out anyway is withdrawn from its queue."""
    chain = Chain(worker_id, pools)
    step = step_claim(step_id, worker_id)
    ran = 0
    try:
        while True:
            while step is not None:
                try:
                    step = step_run(step, worker_id=worker_id, pools=pools, chain=chain)
                    ran += 1
                except Superseded as superseded:
                    step = superseded.next_step
            step = chain.finish()
            while step is None and chain.handed_off:
                sibling = chain.handed_off.pop(0)
                step = step_claim(sibling.pk, worker_id)
                # Claimed here, or taken by another worker: either way no message is needed.
                was_held = held_messages.release(sibling.pk)
                if step is not None and not was_held:
                    withdraw_message(sibling.pk)
            if step is None:
                return ran
    finally:
        chain.close()


def step_run(step: Step, *, worker_id: str, pools: frozenset[str], chain: Chain | None = None) -> Step | None:
    """Run a claimed step's agent and commit the outcome; returns the successor this worker
    claimed for itself, if any. With a ``chain``, ``step`` may have been started ahead of its
    predecessor's commit, and its own completion may still be in flight when this returns."""

    def settle() -> None:
        if chain is not None:
            chain.settle(step)

    def fail(error: SignalboxError, **kwargs: Any) -> None:
        settle()
        _fail(step, error, worker_id, pools, **kwargs)

    run = step.run
    wf = workflow_get(run.workflow_name, run.workflow_version)
    node = node_of(wf, step)
    agent = agent_instance(step.agent)
    cls = type(agent)
    soft, hard = wf.timeouts_of(node)
    if not cls.pure:
        settle()  # its effects may begin at once: the commit that made the step ready comes first

    if node.approval is not None and step.kind == StepKind.AGENT:
        action = step_action(step, node, run)
        if (step.approved_digest or node.approval.required(run.state)) and digest(action) != step.approved_digest:
            settle()
            _reopen_approval(step, action, worker_id)
            return None

    raw: Any = None
    try:
        raw = step.input = step_input(step, node, run)
        params = cls.Input.model_validate(raw)
    except ValidationError as exc:
        fail(ContractViolation(
            f"input for {step.agent!r} does not satisfy its contract", code=Code.INPUT_CONTRACT, detail=_errors(exc)
        ), payload=raw)
        return None
    except SignalboxError as exc:
        fail(exc)
        return None

    own_state = step.kind in (StepKind.AGENT, StepKind.ROUTE)
    ctx = AgentContext(
        run_id=run.pk,
        step_key=step.key,
        attempt=step.attempt,
        state=StateView(
            run.state if step.kind != StepKind.COMPENSATE else {},
            reads=node.reads if step.kind != StepKind.COMPENSATE else frozenset(),
            writes=node.writes if own_state else frozenset(),
        ),
        seed=run.seed,
        trace_id=run.trace_id,
        time_scale=settings.SIGNALBOX["AGENT_TIME_SCALE"],
        tools=(tools := StepTools(step)),
        soft_deadline=time.monotonic() + soft.total_seconds(),
        before_acting=settle,
    )
    result: Any = None
    with lease_keeper.hold(step.pk, step.attempt, worker_id, hard_after=hard.total_seconds()):
        try:
            with interrupt_after(soft.total_seconds()):
                result = agent.run(params, ctx)
        except SignalboxError as exc:
            fail(exc, records=tools.take_records())
            return None
        except Exception as exc:  # unknown agent exceptions are retried, then recorded
            log.warning("agent %s raised", step.agent, exc_info=True)
            fail(TransientError(f"{type(exc).__name__}: {exc}", code=Code.AGENT_EXCEPTION), records=tools.take_records())
            return None

    output: Any = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    contract = output_contract(step, node)
    try:
        if contract is not cls.Output:  # a fallback agent: its own contract, then the node's
            output = cls.Output.model_validate(output).model_dump(mode="json")
        output = contract.model_validate(output).model_dump(mode="json")
    except ValidationError as exc:
        fail(ContractViolation(
            f"output of {step.agent!r} does not satisfy its contract", code=Code.OUTPUT_CONTRACT, detail=_errors(exc)
        ), payload=output, records=tools.take_records())
        return None
    size = len(_json_bytes(output))
    if size > settings.SIGNALBOX["MAX_PAYLOAD_BYTES"]:
        fail(ContractViolation(
            f"output of {step.agent!r} is {size} bytes; the limit is {settings.SIGNALBOX['MAX_PAYLOAD_BYTES']}",
            code=Code.PAYLOAD_TOO_LARGE,
        ), payload=output, records=tools.take_records())
        return None
    step.input = raw
    done = Completion(step, output, ctx.state.written, ctx.usage.as_dict(), tools.take_records(), ctx.degraded)
    try:
        return step_complete(done, worker_id=worker_id, pools=pools,
                             handed_off=chain.handed_off if chain is not None else None, chain=chain)
    except Exception as exc:  # the commit failed (database gone, a bug): retried, then bounded
        settle()
        _commit_failed(done, exc, worker_id, pools)
        return None


#: Optimistic completions retried with fresh run data before falling back to the row lock.
OPTIMISTIC_TRIES = 4


def step_complete(
    done: Completion, *, worker_id: str, pools: frozenset[str], handed_off: list[Step] | None = None,
    chain: Chain | None = None, run: Run | None = None,
) -> Step | None:
    """Commit a successful step and advance its run in one transaction, fenced by the token.

    On PostgreSQL the run row read at claim time (or ``run``) is used without a lock: the fence,
    the run's version check, every write and the COMMIT go out in one round trip; if another
    transaction wrote the run meanwhile, it is read again and the advance recomputed. With a
    ``chain``, that round trip is sent and not waited for (``Chain.send``). Elsewhere (and after
    repeated conflicts) the run row is locked first."""
    step, now = done.step, done.now
    values = {
        "status": StepStatus.SUCCEEDED, "input": step.input, "output": done.output, "usage": done.usage,
        "finished_at": now, "lease_owner": "", "lease_expires_at": None,
    }
    if done.degraded:
        values["degraded"] = step.degraded = done.degraded
    hold = handed_off is not None

    def advance(run: Run, *, optimistic: bool, batch: Batch | None = None) -> Tx:
        tx = _advance_after(step, run, now, done.output, done.written, worker_id, pools, optimistic=optimistic,
                            batch=batch, tool_calls=done.records, hold_handoffs=hold)
        tx.fence = (step.pk, step.attempt, worker_id, values)
        return tx

    run = run or step.run
    if is_postgres():
        # Inside an outer transaction (a caller's atomic block) a batch cannot commit by itself.
        batched = not db().in_atomic_block
        for _ in range(OPTIMISTIC_TRIES):
            assert run is not None
            try:
                if batched:
                    # The common case: every write, the checks and the commit in ONE statement
                    # string (one round trip); paths that write earlier fall back below.
                    batch = Batch()
                    group = chain.open if chain is not None and chain.open is not None and chain.open.ahead is step else None
                    # Joining a batch not sent yet, the advance must not read the database: the
                    # rows it would read do not have that batch's writes (a map's items, the
                    # steps a failing run undoes). A query sends the batch first (the fallback).
                    with refusing_queries(NeedsTransaction) if group is not None else nullcontext():
                        tx = advance(run, optimistic=True, batch=batch)
                        if group is not None:
                            # Started before its sibling's completion was sent: claimed and
                            # completed in one statement of that same transaction.
                            claimed_values = {**values, "attempt": step.attempt, "started_at": step.started_at}
                            tx.fence, tx.fence_claims = (step.pk, step.attempt, worker_id, claimed_values), True
                            tx.record(Verb.STEP_CLAIMED, "step", step.pk, step=step, actor_type=ActorType.SYSTEM,
                                      actor_id=worker_id, attempt=step.attempt, worker=worker_id)
                            tx.audit.insert(0, tx.audit.pop())
                        tx.flush()
                    members: list[Member] = [(done, tx, None)]
                    if group is not None:
                        assert chain is not None
                        chain.open = None
                        group.batch.extend(batch)
                        batch, members = group.batch, [*group.members, (done, tx, group.sibling)]
                    elif chain is not None:
                        # The previous completion must be in before this one goes out; it also
                        # brings the list of handed-off siblings up to date.
                        chain.settle(step)
                    # This worker's chain ends here: the sibling it handed to the broker first
                    # is claimed in this same transaction if nobody has taken it (instead of a
                    # claim transaction of its own right after), or, if it is pure, runs first
                    # and joins this transaction with its own completion.
                    sibling = handed_off[0] if handed_off and tx.local_step is None and not tx.run.is_terminal else None
                    if chain is not None and sibling is not None and chain.may_join(sibling, tx.run, now):
                        return chain.hold(batch, members, sibling, now)
                    if sibling is not None:
                        lease_until = now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
                        store.claim_in_batch(batch, sibling.pk, worker_id, now, lease_until)
                    if chain is not None:
                        return chain.send(batch, members, sibling)
                    rows = batch.run()
                    claimed = None
                    was_held = False
                    if sibling is not None:
                        assert handed_off is not None
                        handed_off.remove(sibling)
                        was_held = held_messages.release(sibling.pk)
                        claimed = tx.local_step = store.claimed_from_row(rows[0] if rows else None, now)
                        if claimed is not None:  # one live message for the whole transaction
                            tx.flushed_events.extend(claim_events(claimed, now))
                    for callback in tx.after_commit:
                        callback()
                    if claimed is not None and sibling is not None and not was_held:
                        withdraw_message(sibling.pk)
                    note_handoff(tx, pools, handed_off)
                    return tx.local_step
                if chain is not None:
                    chain.settle(step)
                with pipeline(), transaction.atomic():
                    tx = advance(run, optimistic=True)
                    tx.flush()
                note_handoff(tx, pools, handed_off)
                return tx.local_step
            except NeedsTransaction:
                batched = False
                if chain is not None:
                    chain.settle(step)
                run = store.run_fetch(step.run_id)
            except DatabaseError as exc:
                failed = store.expectation_failed(exc)
                if failed == store.LEASE_LOST:
                    log.warning("step %s lost its lease (token %s); its result is discarded", step.pk, step.attempt)
                    return None
                if failed != store.RUN_CHANGED:
                    raise
                run = store.run_fetch(step.run_id)
    if chain is not None:
        chain.settle(step)
    with pipeline(), transaction.atomic():
        run = store.lock_run_and_fence_step(step.run_id, step.pk, step.attempt, worker_id, values)
        if run is None:
            log.warning("step %s lost its lease (token %s); its result is discarded", step.pk, step.attempt)
            return None
        tx = advance(run, optimistic=False)
        tx.fence = None
        tx.flush()
    note_handoff(tx, pools, handed_off)
    return tx.local_step


def _advance_after(
    step: Step, run: Run, now: Any, output: dict[str, Any], written: dict[str, Any],
    worker_id: str, pools: frozenset[str], *, optimistic: bool, batch: Batch | None = None,
    tool_calls: tuple[list[Any], list[Any]] = ([], []), hold_handoffs: bool = False,
) -> Tx:
    """What the step's success changes: its outputs in state, the next steps, the run's status."""
    step.run = run
    step.status, step.output, step.finished_at = StepStatus.SUCCEEDED, output, now
    tx = Tx(run, now, actor_type=ActorType.AGENT, actor_id=step.agent, worker_id=worker_id,
            local_pools=pools, optimistic=optimistic, batch=batch)
    tx.hold_handoffs = hold_handoffs
    tx.tool_calls = list(tool_calls[0])
    tx.audit.extend(tool_calls[1])
    tx._left(StepStatus.RUNNING)
    tx.step_event(step, "succeeded")
    node = node_of(tx.wf, step)
    try:
        if run.is_terminal or (run.status == RunStatus.COMPENSATING and step.kind != StepKind.COMPENSATE):
            # Cancelled or failed meanwhile: the fence below fails (the step was cancelled).
            return tx
        if step.degraded:
            tx.note_degraded(step, step.degraded)
        if now > run.deadline_at and run.status != RunStatus.COMPENSATING:
            raise LimitExceeded(
                f"run stopped by its max_duration bound ({tx.wf.max_duration})", code=Code.RUN_DEADLINE,
                detail={"bound": "max_duration"},
            )
        tx.step_succeeded(step, node, output, written)
    except SignalboxError as exc:
        tx.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return tx


def _fail(
    step: Step, error: SignalboxError, worker_id: str, pools: frozenset[str], *, payload: Any = None,
    records: tuple[list[Any], list[Any]] | None = None,
) -> None:
    """Commit a failed attempt: retry a transient error with backoff, otherwise fail the step."""
    now = timezone.now()
    with transaction.atomic():
        run = run_lock(step.run_id)
        current = Step.objects.get(pk=step.pk)
        if current.status != StepStatus.RUNNING or (current.attempt, current.lease_owner) != (step.attempt, worker_id):
            log.warning("step %s lost its lease before recording %s", step.pk, error.code)
            return None
        current.run = run
        # Steps this creates (a degraded result goes on to its successors) go out by the broker.
        tx = Tx(run, now, actor_type=ActorType.AGENT, actor_id=step.agent, worker_id=worker_id)
        if records is not None:  # the attempt's tool calls, written with its outcome
            tx.tool_calls = list(records[0])
            tx.audit.extend(records[1])
        failures = current.failures + 1
        log_entry = {
            "attempt": current.attempt, "agent": current.agent, "class": error.error_class, "code": error.code,
            "message": error.message[:500], "at": now.isoformat(), "worker": worker_id,
        }
        attempts_log = [*current.attempts_log, log_entry]
        node = node_of(tx.wf, current)
        # The retry window runs from the first failure since the failure count was last reset
        # (by a fallback agent or an operator's retry).
        window_start = datetime.fromisoformat(attempts_log[-failures]["at"]) if failures <= len(attempts_log) else now
        within = tx.wf.retry_within_of(node)
        delay = retry_delay(failures)
        in_window = now + timedelta(seconds=delay) - window_start <= within
        if error.error_class == ErrorClass.TRANSIENT and failures < current.max_attempts and in_window:
            tx.move(
                current, StepStatus.QUEUED, failures=failures, attempts_log=attempts_log, lease_owner="",
                lease_expires_at=None, available_at=now + timedelta(seconds=delay), published_at=now,
                error_class=error.error_class, error_code=error.code, error_message=error.message,
            )
            tx.publish.append((current, delay))
            tx.record(Verb.STEP_RETRY_SCHEDULED, "step", current.pk, step=current, code=error.code, delay_seconds=round(delay, 3), failures=failures)
        else:
            Step.objects.filter(pk=current.pk).update(failures=failures, attempts_log=attempts_log)
            current.failures, current.attempts_log = failures, attempts_log
            if error.error_class == ErrorClass.TRANSIENT and failures >= current.max_attempts:
                error = LimitExceeded(
                    f"gave up after {failures} attempts (max_attempts {current.max_attempts}); last error: {error.message}",
                    code=Code.MAX_ATTEMPTS,
                    detail={"bound": "max_attempts", "limit": current.max_attempts, "last_error": error.code},
                )
            elif error.error_class == ErrorClass.TRANSIENT:
                error = LimitExceeded(
                    f"gave up after {failures} attempts: retrying would pass the retry window of "
                    f"{within.total_seconds():g} s; last error: {error.message}",
                    code=Code.RETRY_WINDOW,
                    detail={"bound": "retry_within", "limit_seconds": within.total_seconds(), "last_error": error.code},
                )
            if current.input is None:  # the input this attempt was given, for the escalation
                current.input = step.input
            tx.step_exhausted(current, error, payload=payload)
        tx.flush()
    return None


def retry_delay(failures: int) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**(n-1)))."""
    base = settings.SIGNALBOX["RETRY_BASE_SECONDS"]
    cap = settings.SIGNALBOX["RETRY_MAX_SECONDS"]
    return random.uniform(0, min(cap, base * 2 ** (failures - 1)))


def _reopen_approval(step: Step, action: dict[str, Any], worker_id: str) -> None:
    """What would execute differs from what was approved (or nothing was): ask again."""
    now = timezone.now()
    with transaction.atomic():
        run = run_lock(step.run_id)
        current = Step.objects.get(pk=step.pk)
        if current.status != StepStatus.RUNNING or (current.attempt, current.lease_owner) != (step.attempt, worker_id):
            return
        current.run = run
        tx = Tx(run, now, worker_id=worker_id)
        node = tx.wf.node(current.node)
        if current.approved_digest:
            tx.record(
                Verb.APPROVAL_STALE, "step", current.pk, step=current, payload=action,
                approved_digest=current.approved_digest, now_digest=digest(action),
            )
        tx.move(current, StepStatus.WAITING, lease_owner="", lease_expires_at=None, approved_digest="")
        tx.open_approval(current, node, action)
        tx.flush()


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _json_bytes(value: Any) -> bytes:
    import json

    return json.dumps(value, separators=(",", ":"), default=str).encode()
