"""A worker's chain of steps, with its commits sent ahead.

One message gives a worker one step; the chain is that step, each successor the worker claimed
for itself inside the previous completion, and the siblings it handed off in its own pools
(claimed when the chain stops). With a store that can send a commit without waiting for its
answer (PostgreSQL), each completion goes out that way and the next step, if its agent is pure,
starts meanwhile; pure siblings commit together. This module keeps what is in flight; it is
told how to redo a completion whose commit did not go through (``Chain.recommit``), rather
than knowing the module that does it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from orchestration import dispatch
from orchestration.advance import node_of
from orchestration.changes import Changes
from orchestration.leases import alarm_blocked
from orchestration.models import Run, Step, StepKind, StepStatus, ToolCall
from orchestration.registry import agent_class, workflow_get
from orchestration.runtime import Runtime
from orchestration.store import LeaseLost, Pending, RunChanged, StepTaken, WriteBatch
from orchestration.worker.costs import CallWorst, block_of, call_worst, hold_for, worst_kept
from policies.active import ActivePolicy
from policies.blocks import Block
from policies.evaluate import Decision
from policies.ledger import (
    Held,
    HoldRequest,
    Settlement,
    ceiling_release,
    hold_scope_ids,
    settlement_apply,
)
from policies.models import Reservation, ReservationKind

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """What a step's successful attempt produced, enough to commit it again from scratch."""

    step: Step
    output: dict[str, Any]
    written: dict[str, Any]
    usage: dict[str, Any]
    tool_calls: list[ToolCall]
    tool_entries: list[Any]
    degraded: str
    now: datetime
    #: The policy's decisions about the attempt's tool calls.
    decisions: list[Decision] = field(default_factory=list)
    #: The attempt's reservation, settled in the completion's own transaction.
    settlement: Settlement | None = None

    @classmethod
    def now_from(
        cls,
        step: Step,
        output: dict[str, Any],
        written: dict[str, Any],
        usage: dict[str, Any],
        records: tuple[list[Any], list[Any], list[Decision]],
        degraded: str,
        settlement: Settlement | None = None,
    ) -> Completion:
        return cls(
            step,
            output,
            written,
            usage,
            list(records[0]),
            list(records[1]),
            degraded,
            timezone.now(),
            list(records[2]),
            settlement,
        )


def settle_apart(done: Completion) -> None:
    """The completion will not be written (its lease was lost, or committing it failed): its
    reservation is settled on its own, so what the call cost is counted either way."""
    if done.settlement is not None:
        _apply(done.settlement)


def _apply(settlement: Settlement) -> None:
    try:
        settlement_apply(settlement)
    except Exception:
        log.exception("settling reservation %s failed", settlement.reservation_id)


#: One completion in a batch: what it produced, the changes that write it, and the handed-off
#: sibling it is (a pure step run before its claim, claimed and completed in one statement).
Member = tuple[Completion, Changes, "Step | None"]

#: Commits a completion again from scratch (after a conflict): returns the step to run next.
Recommit = Callable[[Completion, "Run | None"], "Step | None"]
#: Records that committing a completion failed for another reason (the database is gone).
CommitFailed = Callable[[Completion, BaseException], None]


class Superseded(BaseException):
    """A step started ahead of its predecessor's commit, and that commit did not go through as
    sent: nothing of this step was written, and the worker goes on with ``next_step`` instead
    (or with nothing). A ``BaseException``, so that an agent's ``except Exception`` lets it by."""

    def __init__(self, next_step: Step | None) -> None:
        super().__init__("the step was started ahead of a commit that did not go through as sent")
        self.next_step = next_step


class Chain:
    """The steps one worker runs from one message (see the module docstring).

    The answer of a commit sent ahead is read (:meth:`settle`) before the step started meanwhile
    does anything that needs the commit to have happened: touching the database, calling a tool,
    waiting, recording a failure, or starting an agent that is not ``pure``. If the commit did
    not go through as sent, the early work is dropped (:class:`Superseded`).

    Siblings commit together, as a superstep: when a completion makes nothing ready for this
    worker and the sibling it would claim next runs a pure agent, the completion is not sent
    yet; the sibling runs first and its completion, which claims it in the same statement, joins
    the same transaction (:meth:`hold`)."""

    def __init__(
        self, worker_id: str, rt: Runtime, *, recommit: Recommit, commit_failed: CommitFailed
    ) -> None:
        self.worker_id = worker_id
        self.rt = rt
        self.recommit = recommit
        self.commit_failed = commit_failed
        #: Steps of this chain's runs handed to the broker in this worker's pools, to claim when
        #: the chain stops (their wake-up messages are held meanwhile).
        self.handed_off: list[Step] = []
        #: The completion in flight, if any.
        self.committing: Committing | None = None
        #: Completions not sent yet, waiting for the sibling that runs meanwhile to join them.
        self.open: OpenBatch | None = None
        #: Steps whose reservation was asked for in the batch that claims them, and that batch.
        self.holds: dict[int, WriteBatch] = {}
        #: Reservations sent on their own (``hold_ahead``) whose answer was not read yet.
        self.holds_sent: dict[int, Pending] = {}
        #: The budget block this worker holds per run (``policies.blocks``), and what each step
        #: took from one: a call's worst case (with the request it stands for until it is read).
        self.blocks: dict[int, Block] = {}
        self.taken: dict[int, tuple[Block, Decimal]] = {}
        #: Steps whose call was taken from a block (:meth:`share`), with its worst case.
        self.shares: dict[int, Decimal] = {}
        #: Every block made in this chain and not settled yet (a run's earlier block may still
        #: have a call in flight when its next one is made): settled at the latest by :meth:`close`.
        self.unsettled: list[Block] = []

    @property
    def pools(self) -> frozenset[str]:
        return self.rt.pools

    def settle(self, step: Step) -> None:
        """``step`` is about to need its predecessor's commit: make sure it happened. Raises
        Superseded when the worker should run something else than ``step`` after all."""
        if self.open is not None:
            # ``step`` started ahead of a batch not sent yet: it goes now, with step's claim.
            self._send_open(claim=True)
        committing, self.committing = self.committing, None
        if committing is not None and committing.confirm() is not step:
            raise Superseded(committing.confirm())

    def ask_hold(
        self,
        batch: WriteBatch,
        step: Step,
        settling: list[Settlement],
        now: datetime,
        *,
        inserted: bool,
    ) -> None:
        """Reserve for ``step`` (claimed by ``batch``) in ``batch`` itself, if its call has a
        worst case known now and a ceiling counts it (``orchestration.worker.costs.hold_for``).

        Every statement that locks scope rows locks them in id order; two statements of one
        transaction keep that order only if they lock the same rows. So a batch that settles
        calls (``settling``) asks only if each of them counts against exactly the rows this
        reservation would lock (the same run, workflow, tenant, and agent where a ceiling is
        kept per agent); otherwise the step reserves on its own when it runs. ``inserted``: the
        batch inserts ``step`` (a successor it created claimed), so that settlement and this
        reservation can be one statement."""
        if step.id in self.holds or step.id in self.shares:
            return  # reserved already, in the batch that inserted it (:meth:`ask_hold_queued`)
        request = self._unshared(step, now)
        if request is None:
            return
        closing = self.close_block(step.run_id)  # used up: settled here, a new one asked for
        if closing is not None:
            batch.settle(closing, now)
            settling = [*settling, closing]
        if not _same_rows(request, settling):
            return
        batch.hold(step.id, block_of(request), with_settlement=inserted)
        self.holds[step.id] = batch

    def ask_hold_queued(
        self, batch: WriteBatch, changes: Changes, settling: list[Settlement], now: datetime
    ) -> None:
        """Reserve in ``batch`` for the first sibling it hands off in this worker's pools that
        this worker may run before its claim (a pure agent, :meth:`may_join`): its reservation
        then costs no transaction of its own when it runs ahead to join a later completion, as
        the classify step's two branches do. The same rule as :meth:`ask_hold` keeps the scope
        rows locked in id order. A sibling another worker takes after all gives it back when
        this chain ends (:meth:`close`)."""
        sibling = next(
            (s for s in changes.handed_off() if s.pool in self.pools and s.id not in self.holds),
            None,
        )
        if sibling is None or not self.may_join(sibling, changes.run, now):
            return
        request = self._unshared(sibling, now, queued=True)
        if request is None or not _same_rows(request, settling):
            return
        batch.hold(sibling.id, request)
        self.holds[sibling.id] = batch

    def hold_ahead(self, step: Step) -> bool:
        """A pure step's reservation, if it is not answered yet (:meth:`hold_in_flight`): True
        when its answer is on its way, to be read before its completion (:meth:`take_held`)
        while the agent runs meanwhile. A step claimed on its own (from the broker) whose
        reservation was not asked for with its claim sends it now, without waiting."""
        if not (
            step.id in self.holds
            or step.id in self.shares  # took its call from the run's block already
            or not self.rt.store.pipelined
            or self.committing is not None
            or self.open is not None
        ):
            request = self._unshared(step, timezone.now())
            if request is not None:
                self.holds[step.id], self.holds_sent[step.id] = self.rt.store.hold_send(
                    step.id, request
                )
        return self.hold_in_flight(step)

    def shared(self, step: Step, active: ActivePolicy) -> Reservation | None:
        """The budget block ``step``'s call was taken from (:meth:`share`), if it was, under
        ``active`` (the policy in force now, whose worst case for the call the block
        covers); the block's share is then the step's reservation. None otherwise: the step
        reserves as :func:`~orchestration.worker.costs.cost_reserve` says."""
        amount = self.shares.get(step.id)
        if amount is None:
            return None
        worst = worst_kept(step, active)
        if worst is None or worst.amount > amount:
            return None
        del self.shares[step.id]
        return self.taken[step.id][0].reservation

    def _unshared(self, step: Step, now: datetime, *, queued: bool = False) -> HoldRequest | None:
        """The reservation ``step``'s call needs (``worker.costs.hold_for``), unless it has
        none or it was taken from the run's budget block (:meth:`share`)."""
        worst = call_worst(step)
        if worst is None or self.share(step, worst, now):
            return None
        return hold_for(step, self.worker_id, now, queued=queued, worst=worst)

    def share(self, step: Step, worst: CallWorst, now: datetime) -> bool:
        """Take ``step``'s call (``worst``) from the budget block this worker holds for its
        run, if it fits there: no reservation of its own. The block must count against the
        same ceilings in the same periods (the policy or the day may have changed since)."""
        block = self.blocks.get(step.run_id)
        if block is None or block.request is None or worst.scopes != block.request.scopes:
            return False
        if not block.same_periods(now) or not block.take(worst.amount, now, worst.span):
            return False
        self.taken[step.id] = (block, worst.amount)
        # The step's reservation is answered by the block (:meth:`take_held`).
        self.shares[step.id] = worst.amount
        return True

    def spend(self, step: Step, cost: Callable[[Decimal], Decimal | None]) -> Settlement:
        """The call ``step`` took from a block was made: its record, with what ``cost`` says it
        cost given the worst case taken for it."""
        block, worst = self.taken.pop(step.id)
        return block.spend(
            step_id=step.id, action=f"agent:{step.agent}", worst=worst, actual=cost(worst)
        )

    def unused(self, step_id: int, found: Held | None) -> None:
        """The reservation ``found`` asked for ``step_id`` goes back unused: a call's is
        released, a share of a block goes back to the block (which stays the chain's)."""
        if found is None or found.reservation is None:
            return
        if found.reservation.kind == ReservationKind.BLOCK:
            taken = self.taken.pop(step_id, None)
            if taken is not None:
                taken[0].give_back(taken[1])
        else:
            ceiling_release(found.reservation.pk)

    def leave_run(self, batch: WriteBatch, run_id: int, now: datetime) -> list[Settlement]:
        """This worker's chain claims nothing more of run ``run_id`` in ``batch``: the budget
        block it holds for the run is done with. It waits to be settled with others
        (``orchestration.settling``); once ``CEILING_SETTLE_TOGETHER`` of them wait, they are
        settled in ``batch`` together. Returns the settlements ``batch`` writes."""
        closing = self.close_block(run_id)
        if closing is None:
            return []
        together = settings.SIGNALBOX["CEILING_SETTLE_TOGETHER"]
        if together <= 1:
            batch.settle(closing, now)
            return [closing]
        self.rt.settling.add(closing, settings.SIGNALBOX["CEILING_SETTLE_SECONDS"])
        closings = self.rt.settling.take(together)
        if closings:
            batch.settle_many(closings, now)
        return closings

    def close_block(self, run_id: int) -> Settlement | None:
        """Stop using the run's budget block: its settlement, for the caller's transaction
        (None: no block, or a call taken from it is still to be recorded)."""
        block = self.blocks.get(run_id)
        if block is None or any(b is block for b, _ in self.taken.values()):
            return None
        del self.blocks[run_id]
        self.unsettled.remove(block)
        return block.settlement()

    def hold_in_flight(self, step: Step) -> bool:
        """Whether the answer to ``step``'s reservation is still on its way."""
        batch = self.holds.get(step.id)
        if batch is None:
            return False
        committing = self.committing
        return step.id in self.holds_sent or (committing is not None and committing.batch is batch)

    def take_held(self, step: Step) -> Held | None:
        """The answer to ``step``'s reservation asked for in its claiming batch (that batch has
        been read: call after :meth:`settle`) or sent on its own, once; None if none was asked.
        A batch that failed made none."""
        return self._take_held(step.id)

    def _take_held(self, step_id: int) -> Held | None:
        shared = self.shares.pop(step_id, None)
        if shared is not None:  # taken from the run's block: the block answers for it
            block = self.taken[step_id][0]
            assert block.request is not None  # a block shared out was asked for here
            return Held(block.request, block.reservation, (), matched=True, share=shared)
        batch = self.holds.pop(step_id, None)
        sent = self.holds_sent.pop(step_id, None)
        if sent is not None:
            try:
                sent.result()
            except Exception:
                log.warning("the reservation of step %s was not made", step_id, exc_info=True)
        held = batch.held(step_id) if batch is not None else None
        if (
            held is not None
            and held.reservation is not None
            and held.reservation.kind == ReservationKind.BLOCK
        ):
            # A new block: this call is its first; the run's next calls here take from it.
            block = Block(held.reservation, request=held.request)
            block.take(held.request.amount, held.request.now, timedelta(0))
            self.taken[step_id] = (block, held.request.amount)
            self.unsettled.append(block)
            if held.reservation.run_id is not None:  # the run's next calls take from this one
                self.blocks[held.reservation.run_id] = block
        return held

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
        if not agent_class(sibling.agent).pure or not self.rt.store.pipelined:
            return False
        return (
            node_of(workflow_get(run.workflow_name, run.workflow_version), sibling).approval is None
        )

    def hold(self, batch: WriteBatch, members: list[Member], sibling: Step, now: datetime) -> Step:
        """Keep ``batch`` (the completions of ``members``) unsent and start ``sibling`` now;
        returns the step to run, as a claim would leave it."""
        self.handed_off.remove(sibling)
        ahead = self._as_claimed(sibling, members[-1][1].run, now)
        self.open = OpenBatch(batch, members, sibling, ahead)
        return ahead

    def send(self, batch: WriteBatch, members: list[Member], sibling: Step | None) -> Step | None:
        """Send ``batch`` without waiting; returns the step to start meanwhile: the one the last
        completion claimed, or ``sibling``, claimed by the batch's last statement."""
        pending = batch.send()
        done, changes, _ = members[-1]
        ahead = changes.local_step
        if sibling is not None:
            self.handed_off.remove(sibling)
            ahead = self._as_claimed(sibling, changes.run, done.now)
        self.committing = Committing(self, batch, members, pending, sibling, ahead)
        return ahead

    def close(self) -> None:
        """The chain ends (or failed on the way): read what is in flight, so its messages and
        live events go out, and send the held messages of siblings it will not claim."""
        try:
            self.finish()
        except Exception:
            log.exception("reading the last completion of a chain failed")
        self.rt.held.send_now([s.pk for s in self.handed_off])
        self._release_unused()
        self._settle_blocks()

    def _release_unused(self) -> None:
        """Give back what was reserved for steps this chain did not run after all (a sibling
        another worker took); the reaper would, at their expiry."""
        for step_id in [*self.holds, *self.shares]:
            self.release_held(step_id)

    def _settle_blocks(self) -> None:
        """The budget blocks still open (their runs' last calls here were not followed by a
        completion that could settle them) wait to be settled with others."""
        seconds = settings.SIGNALBOX["CEILING_SETTLE_SECONDS"]
        for block in self.unsettled:
            self.rt.settling.add(block.settlement(), seconds)
        self.unsettled.clear()
        self.blocks.clear()
        self.taken.clear()

    def release_held(self, step_id: int) -> None:
        """Give back the reservation asked for ``step_id``, if one was made (never raises)."""
        try:
            self.unused(step_id, self._take_held(step_id))
        except Exception:
            log.exception("giving back the reservation of step %s failed", step_id)

    def note_handoff(self, changes: Changes) -> None:
        """Keep the steps ``changes`` handed off in this worker's pools, to claim at the end."""
        self.handed_off.extend(step for step in changes.handed_off() if step.pool in self.pools)

    def _send_open(self, *, claim: bool) -> None:
        group, self.open = self.open, None
        assert group is not None
        sibling: Step | None = None
        if claim:
            sibling = group.sibling
            now = timezone.now()
            group.batch.claim_last(
                sibling.pk, self.worker_id, now, now + timedelta(seconds=self.rt.lease_seconds)
            )
        else:
            self.handed_off.insert(0, group.sibling)
        pending = group.batch.send()
        self.committing = Committing(
            self, group.batch, group.members, pending, sibling, group.ahead if claim else None
        )

    def _as_claimed(self, sibling: Step, run: Run, now: datetime) -> Step:
        ahead = copy.copy(sibling)
        ahead.status, ahead.attempt, ahead.lease_owner = (
            StepStatus.RUNNING,
            sibling.attempt + 1,
            self.worker_id,
        )
        ahead.lease_expires_at = now + timedelta(seconds=self.rt.lease_seconds)
        ahead.started_at = sibling.started_at or now
        ahead.run = run
        return ahead


def _same_rows(request: HoldRequest, settling: list[Settlement]) -> bool:
    """Whether every call ``settling`` settles counts against exactly the scope rows
    ``request`` would lock (so one transaction locks them in one order). A call made from a
    block locks none."""
    settling = [settlement for settlement in settling if not settlement.block]
    if not settling:
        return True
    ids = hold_scope_ids(request)
    return all(ids == frozenset(settlement.scope_ids) for settlement in settling)


class OpenBatch:
    """Completions written into a batch that is not sent yet, while ``ahead`` (the claimed form
    of ``sibling``) runs: its completion joins the batch, or the batch goes with its claim."""

    def __init__(
        self, batch: WriteBatch, members: list[Member], sibling: Step, ahead: Step
    ) -> None:
        self.batch, self.members, self.sibling, self.ahead = batch, members, sibling, ahead


class Committing:
    """Completions sent in one batch whose answer the worker has not read yet, and ``ahead``,
    the step started meanwhile. :meth:`confirm` reads the answer and does what follows a commit
    (wake-ups, held hand-offs, live events); if the batch did not go through (another
    transaction wrote the run first, a lease was lost, a sibling was taken, the database
    failed), it settles the first completion the slow way, drops the rest (their steps are still
    queued and go back to the chain's hand-offs) and returns what the worker should run next."""

    def __init__(
        self,
        chain: Chain,
        batch: WriteBatch,
        members: list[Member],
        pending: Pending,
        sibling: Step | None,
        ahead: Step | None,
    ) -> None:
        self.chain, self.batch, self.members, self.pending = chain, batch, members, pending
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
        rt = chain.rt
        done = self.members[0][0]
        try:
            rows = self.pending.result()
        except Exception as exc:
            for closed in self.batch.closes:  # the budget blocks it settled: on their own
                _apply(closed)
            # The batch rolled back as a whole: its claims too. Steps it would have claimed are
            # still queued (unless another worker took them, which their claim will find).
            taken = [grouped for _, _, grouped in self.members[1:] if grouped is not None]
            chain.handed_off[:0] = [*taken, *([self.sibling] if self.sibling is not None else [])]
            for dropped, _, _ in self.members[1:]:  # run again later: what they cost counts now
                settle_apart(dropped)
            if isinstance(exc, LeaseLost):
                log.warning(
                    "step %s lost its lease (token %s); its result is discarded",
                    done.step.pk,
                    done.step.attempt,
                )
                settle_apart(done)
                return None
            if isinstance(exc, (RunChanged, StepTaken)):
                try:
                    return chain.recommit(done, rt.store.run_get(done.step.run_id))
                except Exception as again:
                    exc = again
            chain.commit_failed(done, exc)
            return None
        if len(self.members) > 1:  # one live message for the whole transaction
            events = [event for _, changes, _ in self.members for event in changes.live]
            for _, changes, _ in self.members[:-1]:
                changes.live = []
            self.members[-1][1].live = events
        for member, (done, changes, grouped) in enumerate(self.members, start=1):
            claimed = None
            if grouped is not None:
                rt.held.release(grouped.pk)  # claimed by this batch: its wake-up is not needed
            last = member == len(self.members)
            if last and self.sibling is not None:
                rt.held.release(self.sibling.pk)
                claimed = changes.local_step = self.batch.claimed_step(rows, done.now)
                if claimed is not None:  # one live message for the whole transaction
                    changes.live.extend(claim_events(claimed, done.now))
            dispatch.send(changes, rt)
            chain.note_handoff(changes)
            if last and self.sibling is not None:
                if claimed is None or self.ahead is None:
                    return claimed
                # The early start assumed the claim's token; another attempt in between changes it.
                return self.ahead if claimed.attempt == self.ahead.attempt else claimed
        return self.members[-1][1].local_step


def claim_events(step: Step, now: Any) -> list[dict[str, Any]]:
    """The live events of a claim (the step runs; its run too, if this claim started it).
    Without ``run_id``: events of a Changes get it when sent."""
    run = step.run
    events: list[dict[str, Any]] = [
        {"kind": "step", "change": "running", "step": step, "key": step.key, "status": "running"}
    ]
    if run.started_at == now:
        events.append({"kind": "run", "change": "running", "status": "running"})
    return events
