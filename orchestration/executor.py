"""The worker side: claim a step, run its agent outside any transaction, commit the outcome.

The hot path of a step is two short transactions: the claim (a conditional UPDATE) and the
completion, which also advances the run and, when this worker serves the next step's pool,
claims that step too so it runs right away without a broker round trip.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from audit.verbs import ActorType, Verb
from console.sql import Batch, db, is_postgres, pipeline
from orchestration import live, store
from orchestration.agents.base import AgentContext, StateView
from orchestration.engine import (
    NeedsTransaction,
    Tx,
    digest,
    node_of,
    output_contract,
    run_lock,
    sent_messages,
    step_action,
    step_input,
)
from orchestration.errors import (
    ContractViolation,
    ErrorClass,
    LimitExceeded,
    SignalboxError,
    StepTimeout,
    TransientError,
)
from orchestration.handoff import held_messages
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
        live.send_on_commit(_claim_events(step, now))
    return step


def _claim_events(step: Step, now: Any) -> list[dict[str, Any]]:
    run = step.run
    events = [{"run_id": run.pk, "kind": "step", "change": "running", "step_id": step.pk, "key": step.key, "status": "running"}]
    if run.started_at == now:
        events.append({"run_id": run.pk, "kind": "run", "change": "running", "status": "running"})
    return events


# --- leases -----------------------------------------------------------------------------------


class LeaseKeeper:
    """Renews the leases of steps this process is running, from one background thread, and
    enforces their hard timeouts: an attempt still running at its hard deadline is failed
    (as a transient ``step_hard_timeout``) and fenced off, so whatever it returns later is
    discarded, even if the agent never yields. If the whole process is stuck, its leases
    simply stop being renewed and the reaper does the same."""

    #: How often the loop looks at hard deadlines, at most (seconds).
    TICK = 0.25

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, str, float | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, step_id: int, token: int, worker_id: str, *, hard_after: float | None = None) -> Iterator[None]:
        deadline = time.monotonic() + hard_after if hard_after else None
        with self._lock:
            self._held[step_id] = (token, worker_id, deadline)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(step_id, None)

    def _loop(self) -> None:
        interval = settings.SIGNALBOX["LEASE_SECONDS"] / 3
        next_renewal = time.monotonic() + interval
        stop = threading.Event()
        while not stop.wait(min(self.TICK, interval)):
            with self._lock:
                held = dict(self._held)
            if not held:
                next_renewal = time.monotonic() + interval
                continue
            now = time.monotonic()
            overdue = {k: v for k, v in held.items() if v[2] is not None and now >= v[2]}
            for step_id, (token, owner, _deadline) in overdue.items():
                with self._lock:
                    self._held.pop(step_id, None)
                self._hard_timeout(step_id, token, owner)
            if now < next_renewal:
                continue
            next_renewal = now + interval
            try:
                until = timezone.now() + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
                for step_id, (token, owner, _deadline) in held.items():
                    if step_id in overdue:
                        continue
                    # Fenced: a lease that was lost (re-claimed by another worker) is not renewed.
                    Step.objects.filter(pk=step_id, status=StepStatus.RUNNING, attempt=token, lease_owner=owner).update(
                        lease_expires_at=until
                    )
            except Exception:
                log.warning("lease renewal failed", exc_info=True)
            finally:
                close_old_connections()

    def _hard_timeout(self, step_id: int, token: int, owner: str) -> None:
        try:
            step = Step.objects.select_related("run").filter(pk=step_id, status=StepStatus.RUNNING, attempt=token).first()
            if step is None:
                return
            log.warning("step %s passed its hard timeout; its attempt %s is abandoned", step_id, token)
            _fail(step, StepTimeout("the step passed its hard timeout and was abandoned", code="step_hard_timeout"),
                  owner, frozenset())
        except Exception:
            log.warning("failing step %s at its hard timeout failed", step_id, exc_info=True)
        finally:
            close_old_connections()


@contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the agent when its soft timeout passes, as Celery's soft
    time limit does: with SIGALRM, which only the main thread can receive. Elsewhere (the
    embedded worker thread) agents see the deadline cooperatively, in ``ctx.check_timeout()``."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise StepTimeout(f"the step ran past its soft timeout of {seconds:g} s", code="step_timeout")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


lease_keeper = LeaseKeeper()


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


def step_execute(step_id: int, *, worker_id: str, pools: frozenset[str]) -> int:
    """Claim and run ``step_id``, then any successor this worker claimed locally.

    Returns how many steps ran. Safe to call with a stale or duplicate message: the claim
    decides, and a step that is not queued is left alone. When the local chain ends, steps of
    the same run that were handed to the broker for this worker's pools are claimed here if no
    other worker has taken them yet. Their wake-up messages are held back meanwhile
    (``orchestration.handoff``): one that went out anyway is withdrawn from its queue."""
    step = step_claim(step_id, worker_id)
    ran = 0
    handed_off: list[int] = []
    try:
        while step is not None:
            ran += 1
            step = step_run(step, worker_id=worker_id, pools=pools, handed_off=handed_off)
            while step is None and handed_off:
                sibling = handed_off.pop(0)
                step = step_claim(sibling, worker_id)
                # Claimed here, or taken by another worker: either way no message is needed.
                was_held = held_messages.release(sibling)
                if step is not None and not was_held:
                    _withdraw_message(sibling)
    finally:
        # Only if something failed on the way: siblings this chain will not claim get their
        # messages now rather than when their hold ends.
        held_messages.send_now(handed_off)
    return ran


def _withdraw_message(step_id: int) -> None:
    """This worker claimed ``step_id`` itself after handing it to the broker: take the message
    back if no worker has taken it yet (it would only find the step running). The step is
    claimed (leased) already, so the message is no longer needed for it to make progress."""
    task_id = sent_messages.pop(step_id, None)
    if task_id is None:
        return
    from console.broker import withdraw

    try:
        withdraw(task_id)
    except Exception:  # the message stays; its claim will simply find the step taken
        log.debug("could not withdraw the message of step %s", step_id, exc_info=True)


def step_run(
    step: Step, *, worker_id: str, pools: frozenset[str], handed_off: list[int] | None = None
) -> Step | None:
    """Run a claimed step's agent and commit the outcome; returns a locally claimed successor."""
    run = step.run
    wf = workflow_get(run.workflow_name, run.workflow_version)
    node = node_of(wf, step)
    agent = agent_instance(step.agent)
    cls = type(agent)
    soft, hard = wf.timeouts_of(node)

    if node.approval is not None and step.kind == StepKind.AGENT:
        action = step_action(step, node, run)
        if (step.approved_digest or node.approval.required(run.state)) and digest(action) != step.approved_digest:
            _reopen_approval(step, action, worker_id)
            return None

    raw: Any = None
    try:
        raw = step.input = step_input(step, node, run)
        params = cls.Input.model_validate(raw)
    except ValidationError as exc:
        _fail(step, ContractViolation(
            f"input for {step.agent!r} does not satisfy its contract", code="input_contract", detail=_errors(exc)
        ), worker_id, pools, payload=raw)
        return None
    except SignalboxError as exc:
        _fail(step, exc, worker_id, pools)
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
    )
    result: Any = None
    with lease_keeper.hold(step.pk, step.attempt, worker_id, hard_after=hard.total_seconds()):
        try:
            with interrupt_after(soft.total_seconds()):
                result = agent.run(params, ctx)
        except SignalboxError as exc:
            _fail(step, exc, worker_id, pools, tools=tools)
            return None
        except Exception as exc:  # unknown agent exceptions are retried, then recorded
            log.warning("agent %s raised", step.agent, exc_info=True)
            _fail(step, TransientError(f"{type(exc).__name__}: {exc}", code="agent_exception"), worker_id, pools, tools=tools)
            return None

    output: Any = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    contract = output_contract(step, node)
    try:
        if contract is not cls.Output:  # a fallback agent: its own contract, then the node's
            output = cls.Output.model_validate(output).model_dump(mode="json")
        output = contract.model_validate(output).model_dump(mode="json")
    except ValidationError as exc:
        _fail(step, ContractViolation(
            f"output of {step.agent!r} does not satisfy its contract", code="output_contract", detail=_errors(exc)
        ), worker_id, pools, payload=output, tools=tools)
        return None
    size = len(_json_bytes(output))
    if size > settings.SIGNALBOX["MAX_PAYLOAD_BYTES"]:
        _fail(step, ContractViolation(
            f"output of {step.agent!r} is {size} bytes; the limit is {settings.SIGNALBOX['MAX_PAYLOAD_BYTES']}",
            code="payload_too_large",
        ), worker_id, pools, payload=output, tools=tools)
        return None
    step.input = raw
    try:
        return step_complete(
            step, output, ctx.state.written, ctx.usage.as_dict(), worker_id=worker_id, pools=pools,
            handed_off=handed_off, tools=tools, degraded=ctx.degraded,
        )
    except Exception as exc:  # the commit failed (database gone, a bug): retried, then bounded
        log.exception("committing step %s failed", step.pk)
        close_old_connections()
        _fail(step, TransientError(f"committing the result failed: {exc!r}", code="commit_failed"), worker_id, pools, tools=tools)
        return None


#: Optimistic completions retried with fresh run data before falling back to the row lock.
OPTIMISTIC_TRIES = 4


def step_complete(
    step: Step, output: dict[str, Any], written: dict[str, Any], usage: dict[str, Any], *, worker_id: str,
    pools: frozenset[str], handed_off: list[int] | None = None, tools: StepTools | None = None,
    degraded: str = "",
) -> Step | None:
    """Commit a successful step and advance its run in one transaction, fenced by the token.

    On PostgreSQL the run row read at claim time is used without a lock: the fence, the run's
    version check, every write and the COMMIT go out in one round trip; if another transaction
    wrote the run meanwhile, it is read again and the advance recomputed. Elsewhere (and after
    repeated conflicts) the run row is locked first."""
    now = timezone.now()
    values = {
        "status": StepStatus.SUCCEEDED, "input": step.input, "output": output, "usage": usage,
        "finished_at": now, "lease_owner": "", "lease_expires_at": None,
    }
    if degraded:
        values["degraded"] = step.degraded = degraded
    tool_calls, tool_entries = tools.take_records() if tools is not None else ([], [])
    run: Run | None = step.run
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
                    tx = _advance_after(step, run, now, output, written, worker_id, pools, optimistic=True, batch=batch,
                                        tool_calls=(tool_calls, tool_entries), hold_handoffs=handed_off is not None)
                    tx.fence = (step.pk, step.attempt, worker_id, values)
                    tx.flush()
                    # This worker's chain ends here: the sibling it handed to the broker first
                    # is claimed in this same transaction if nobody has taken it (instead of a
                    # claim transaction of its own right after).
                    sibling = handed_off[0] if handed_off and tx.local_step is None and not tx.run.is_terminal else None
                    if sibling is not None:
                        lease_until = now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
                        store.claim_in_batch(batch, sibling, worker_id, now, lease_until)
                    rows = batch.run()
                    claimed = None
                    was_held = False
                    if sibling is not None:
                        assert handed_off is not None
                        handed_off.remove(sibling)
                        was_held = held_messages.release(sibling)
                        claimed = tx.local_step = store.claimed_from_row(rows[0] if rows else None, now)
                        if claimed is not None:  # one live message for the whole transaction
                            tx.flushed_events.extend(_claim_events(claimed, now))
                    for callback in tx.after_commit:
                        callback()
                    if claimed is not None and sibling is not None and not was_held:
                        _withdraw_message(sibling)
                    _note_handoff(tx, pools, handed_off)
                    return tx.local_step
                with pipeline(), transaction.atomic():
                    tx = _advance_after(step, run, now, output, written, worker_id, pools, optimistic=True,
                                        tool_calls=(tool_calls, tool_entries), hold_handoffs=handed_off is not None)
                    tx.fence = (step.pk, step.attempt, worker_id, values)
                    tx.flush()
                _note_handoff(tx, pools, handed_off)
                return tx.local_step
            except NeedsTransaction:
                batched = False
                run = store.run_fetch(step.run_id)
            except DatabaseError as exc:
                failed = store.expectation_failed(exc)
                if failed == store.LEASE_LOST:
                    log.warning("step %s lost its lease (token %s); its result is discarded", step.pk, step.attempt)
                    return None
                if failed != store.RUN_CHANGED:
                    raise
                run = store.run_fetch(step.run_id)
    with pipeline(), transaction.atomic():
        run = store.lock_run_and_fence_step(step.run_id, step.pk, step.attempt, worker_id, values)
        if run is None:
            log.warning("step %s lost its lease (token %s); its result is discarded", step.pk, step.attempt)
            return None
        tx = _advance_after(step, run, now, output, written, worker_id, pools, optimistic=False,
                            tool_calls=(tool_calls, tool_entries), hold_handoffs=handed_off is not None)
        tx.flush()
    _note_handoff(tx, pools, handed_off)
    return tx.local_step


def _note_handoff(tx: Tx, pools: frozenset[str], handed_off: list[int] | None) -> None:
    if handed_off is not None:
        handed_off.extend(step_id for step_id, pool in tx.handed_off if pool in pools)


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
                f"run stopped by its max_duration bound ({tx.wf.max_duration})", code="run_deadline",
                detail={"bound": "max_duration"},
            )
        tx.step_succeeded(step, node, output, written)
    except SignalboxError as exc:
        tx.fail_run(exc.code, f"{step.key}: {exc.message}", step=step)
    return tx


def _fail(
    step: Step, error: SignalboxError, worker_id: str, pools: frozenset[str], *, payload: Any = None,
    tools: StepTools | None = None,
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
        if tools is not None:
            tx.tool_calls, entries = tools.take_records()
            tx.audit.extend(entries)
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
                    code="max_attempts",
                    detail={"bound": "max_attempts", "limit": current.max_attempts, "last_error": error.code},
                )
            elif error.error_class == ErrorClass.TRANSIENT:
                error = LimitExceeded(
                    f"gave up after {failures} attempts: retrying would pass the retry window of "
                    f"{within.total_seconds():g} s; last error: {error.message}",
                    code="retry_window",
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
