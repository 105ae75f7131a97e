"""A worker's chain of steps, with its commits sent ahead.

One message gives a worker one step; the chain is that step, each successor the worker claimed
for itself inside the previous completion, and the siblings it handed off in its own pools
(claimed when the chain stops). On PostgreSQL each completion is sent without waiting for its
answer, and the next step, if its agent is pure, starts meanwhile; pure siblings commit
together. ``orchestration.executor`` runs the steps; this module keeps what is in flight.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from infra.sql import Batch, InFlight, db
from orchestration import store
from orchestration.engine import Tx, node_of, sent_messages
from orchestration.handoff import held_messages
from orchestration.leases import alarm_blocked
from orchestration.models import Run, Step, StepKind, StepStatus
from orchestration.registry import agent_class, workflow_get

log = logging.getLogger(__name__)


class Superseded(BaseException):
    """A step started ahead of its predecessor's commit, and that commit did not go through as
    sent: nothing of this step was written, and the worker goes on with ``next_step`` instead
    (or with nothing). A ``BaseException``, so that an agent's ``except Exception`` lets it by."""

    def __init__(self, next_step: Step | None) -> None:
        super().__init__("the step was started ahead of a commit that did not go through as sent")
        self.next_step = next_step


class Chain:
    """The steps one worker runs from one message: the step it claimed, each successor it
    claimed inside the previous completion, then the siblings it handed off in its own pools.

    On PostgreSQL a completion is sent without waiting for its answer (``infra.sql.Batch.send``)
    and the step it claimed for this worker starts at once, while the server commits: the
    worker's Python and the database's work overlap instead of taking turns. The answer is read
    (:meth:`settle`) before that step does anything that needs the commit to have happened:
    touching the database, calling a tool, waiting, recording a failure, or starting an agent
    that is not ``pure``. If the commit did not go through as sent, the early work is dropped
    (:class:`Superseded`) and nothing of it was written.

    Siblings are committed together, as a superstep: when a completion makes nothing ready for
    this worker and the sibling it would claim next runs a pure agent, the completion is not
    sent yet; the sibling runs first and its completion, which claims it in the same statement,
    joins the same transaction (:meth:`hold`)."""

    def __init__(self, worker_id: str, pools: frozenset[str]) -> None:
        self.worker_id = worker_id
        self.pools = pools
        #: Steps of this chain's runs handed to the broker in this worker's pools, to claim when
        #: the chain stops (their wake-up messages are held meanwhile: orchestration.handoff).
        self.handed_off: list[Step] = []
        #: The completion in flight, if any.
        self.committing: Committing | None = None
        #: Completions not sent yet, waiting for the sibling that runs meanwhile to join them.
        self.open: OpenBatch | None = None

    def settle(self, step: Step) -> None:
        """``step`` is about to need its predecessor's commit: make sure it happened. Raises
        Superseded when the worker should run something else than ``step`` after all."""
        if self.open is not None:
            # ``step`` started ahead of a batch not sent yet: it goes now, with step's claim.
            self._send_open(claim=True)
        committing, self.committing = self.committing, None
        if committing is not None and committing.confirm() is not step:
            raise Superseded(committing.confirm())

    def finish(self) -> Step | None:
        """The chain has nothing running: read the completion in flight; returns the step it
        made ready for this worker (now confirmed), if any."""
        if self.open is not None:
            self._send_open(claim=False)
        committing, self.committing = self.committing, None
        return committing.confirm() if committing is not None else None

    def may_join(self, sibling: Step, run: Run, now: datetime) -> bool:
        """Whether ``sibling`` may run before the completion that would claim it is sent: a
        pure agent's step, due, with no approval to check first."""
        if sibling.kind not in (StepKind.AGENT, StepKind.ITEM) or sibling.available_at > now:
            return False
        if not agent_class(sibling.agent).pure or not getattr(db(), "supports_batches_in_flight", False):
            return False
        return node_of(workflow_get(run.workflow_name, run.workflow_version), sibling).approval is None

    def hold(self, batch: Batch, members: list[Member], sibling: Step, now: datetime) -> Step:
        """Keep ``batch`` (the completions of ``members``) unsent and start ``sibling`` now;
        returns the step to run, as a claim would leave it."""
        self.handed_off.remove(sibling)
        ahead = self._as_claimed(sibling, members[-1][1].run, now)
        self.open = OpenBatch(batch, members, sibling, ahead)
        return ahead

    def send(self, batch: Batch, members: list[Member], sibling: Step | None) -> Step | None:
        """Send ``batch`` (the completions of ``members``) without waiting; returns the step to
        start meanwhile: the one the last completion claimed, or ``sibling``, claimed by the
        batch's last statement, as the claim will leave it."""
        inflight = batch.send()
        done, tx, _ = members[-1]
        ahead = tx.local_step
        if sibling is not None:
            self.handed_off.remove(sibling)
            ahead = self._as_claimed(sibling, tx.run, done.now)
        self.committing = Committing(self, members, inflight, sibling, ahead)
        return ahead

    def close(self) -> None:
        """The chain ends (or failed on the way): read what is in flight, so its messages and
        live events go out, and send the held messages of siblings it will not claim."""
        try:
            self.finish()
        except Exception:
            log.exception("reading the last completion of a chain failed")
        held_messages.send_now([s.pk for s in self.handed_off])

    def _send_open(self, *, claim: bool) -> None:
        group, self.open = self.open, None
        assert group is not None
        sibling: Step | None = None
        if claim:
            sibling = group.sibling
            now = timezone.now()
            lease_until = now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
            store.claim_in_batch(group.batch, sibling.pk, self.worker_id, now, lease_until)
        else:
            self.handed_off.insert(0, group.sibling)
        self.committing = Committing(self, group.members, group.batch.send(), sibling, group.ahead if claim else None)

    def _as_claimed(self, sibling: Step, run: Run, now: datetime) -> Step:
        ahead = copy.copy(sibling)
        ahead.status, ahead.attempt, ahead.lease_owner = StepStatus.RUNNING, sibling.attempt + 1, self.worker_id
        ahead.lease_expires_at = now + timedelta(seconds=settings.SIGNALBOX["LEASE_SECONDS"])
        ahead.started_at = sibling.started_at or now
        ahead.run = run
        return ahead


class Completion:
    """What a step's successful attempt produced, enough to commit it again from scratch."""

    def __init__(
        self, step: Step, output: dict[str, Any], written: dict[str, Any], usage: dict[str, Any],
        records: tuple[list[Any], list[Any]], degraded: str,
    ) -> None:
        self.step, self.output, self.written, self.usage = step, output, written, usage
        self.records, self.degraded = records, degraded
        self.now = timezone.now()


#: One completion in a batch: what it produced, the Tx that wrote it, and the handed-off sibling
#: it is (a pure step run before its claim, claimed and completed in one statement), if so.
Member = tuple[Completion, Tx, "Step | None"]


class OpenBatch:
    """Completions written into a batch that is not sent yet, while ``ahead`` (the claimed form
    of ``sibling``) runs: its completion joins the batch, or the batch goes with its claim."""

    def __init__(self, batch: Batch, members: list[Member], sibling: Step, ahead: Step) -> None:
        self.batch, self.members, self.sibling, self.ahead = batch, members, sibling, ahead


class Committing:
    """Completions sent to PostgreSQL in one batch whose answer the worker has not read yet, and
    ``ahead``, the step started meanwhile. :meth:`confirm` reads the answer and does what follows
    a commit (live events, wake-up messages, held hand-offs); if the batch did not go through
    (another transaction wrote the run first, a lease was lost, a sibling was taken, the database
    failed), it settles the first completion the slow way, drops the rest (their steps are still
    queued and go back to the chain's hand-offs) and returns what the worker should run next."""

    def __init__(
        self, chain: Chain, members: list[Member], inflight: InFlight, sibling: Step | None, ahead: Step | None
    ) -> None:
        self.chain, self.members, self.inflight = chain, members, inflight
        self.sibling, self.ahead = sibling, ahead
        self._confirmed = False
        self._next: Step | None = None

    def confirm(self) -> Step | None:
        """The step the worker runs next: ``ahead`` itself when the commit went through as sent."""
        if not self._confirmed:
            self._confirmed = True
            # Not cut short by an agent's soft timeout (SIGALRM): the outcome must be read whole.
            with alarm_blocked():
                self._next = self._read()
        return self._next

    def _read(self) -> Step | None:
        chain = self.chain
        done = self.members[0][0]
        try:
            rows = self.inflight.result()
        except Exception as exc:
            # The batch rolled back as a whole: its claims too. Steps it would have claimed are
            # still queued (unless another worker took them, which their claim will find).
            taken = [grouped for _, _, grouped in self.members[1:] if grouped is not None]
            chain.handed_off[:0] = [*taken, *([self.sibling] if self.sibling is not None else [])]
            failed = store.expectation_failed(exc) if isinstance(exc, DatabaseError) else None
            if failed == store.LEASE_LOST:
                log.warning("step %s lost its lease (token %s); its result is discarded", done.step.pk, done.step.attempt)
                return None
            from orchestration.executor import _commit_failed, step_complete

            if failed in (store.RUN_CHANGED, store.STEP_TAKEN):
                try:
                    return step_complete(done, worker_id=chain.worker_id, pools=chain.pools,
                                         handed_off=chain.handed_off, run=store.run_fetch(done.step.run_id))
                except Exception as again:
                    exc = again
            _commit_failed(done, exc, chain.worker_id, chain.pools)
            return None
        if len(self.members) > 1:  # one live message for the whole transaction
            events = [event for _, tx, _ in self.members for event in tx.flushed_events]
            for _, tx, _ in self.members[:-1]:
                tx.flushed_events.clear()
            self.members[-1][1].flushed_events[:] = events
        for member, (done, tx, grouped) in enumerate(self.members, start=1):
            claimed, was_held = None, False
            if grouped is not None:
                was_held = held_messages.release(grouped.pk)
            last = member == len(self.members)
            if last and self.sibling is not None:
                was_held = held_messages.release(self.sibling.pk)
                claimed = tx.local_step = store.claimed_from_row(rows[0] if rows else None, done.now)
                if claimed is not None:  # one live message for the whole transaction
                    tx.flushed_events.extend(claim_events(claimed, done.now))
            for callback in tx.after_commit:
                callback()
            if grouped is not None and not was_held:
                withdraw_message(grouped.pk)
            if claimed is not None and not was_held:
                assert self.sibling is not None
                withdraw_message(self.sibling.pk)
            note_handoff(tx, chain.pools, chain.handed_off)
            if last and self.sibling is not None:
                if claimed is None or self.ahead is None:
                    return claimed
                # The early start assumed the claim's token; another attempt in between changes it.
                return self.ahead if claimed.attempt == self.ahead.attempt else claimed
        return self.members[-1][1].local_step


def claim_events(step: Step, now: Any) -> list[dict[str, Any]]:
    run = step.run
    events = [{"run_id": run.pk, "kind": "step", "change": "running", "step_id": step.pk, "key": step.key, "status": "running"}]
    if run.started_at == now:
        events.append({"run_id": run.pk, "kind": "run", "change": "running", "status": "running"})
    return events


def withdraw_message(step_id: int) -> None:
    """This worker claimed ``step_id`` itself after handing it to the broker: take the message
    back if no worker has taken it yet (it would only find the step running). The step is
    claimed (leased) already, so the message is no longer needed for it to make progress."""
    task_id = sent_messages.pop(step_id, None)
    if task_id is None:
        return
    from infra.broker import withdraw

    try:
        withdraw(task_id)
    except Exception:  # the message stays; its claim will simply find the step taken
        log.debug("could not withdraw the message of step %s", step_id, exc_info=True)


def note_handoff(tx: Tx, pools: frozenset[str], handed_off: list[Step] | None) -> None:
    if handed_off is not None:
        handed_off.extend(step for step in tx.handed_off if step.pool in pools)
