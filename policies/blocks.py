"""A run's budget block: several calls' worst cases reserved at once, spent call by call in the
memory of the worker that holds it.

A reservation per call writes every scope row it counts against twice (reserved, then settled):
under a policy with a run's, a workflow's, a tenant's and a global ceiling that is eight row
updates a call, most of them on the few rows every worker shares. A block is one reservation
of the same kind (``ReservationKind.BLOCK``, made by the same conditional statement, so it
fits under every ceiling or is refused whole) whose amount covers several calls. The worker
that holds it takes each call's worst case from it in memory (:meth:`Block.take`); each call
made is recorded with its actual cost and no scope rows (:meth:`Block.spend`: on its step's
row by the completion that writes it, ``policies.calls``, or else as a settled row of its
own); the block's settlement (:meth:`Block.settlement`) then charges the sum of its calls to
every scope and frees the rest. A worker settles the blocks it is done with several at a time
(``orchestration.settling``, ``policies.ledger.settlements_prepared``).

Why a ceiling is still never passed: the block's whole amount is counted in every scope while
it is held, a call is taken from it only if its worst case fits what is left, and a call is
charged at most its worst case (its max tokens were clamped to it). A call that does not fit
a block reserves on its own, as before; so near a limit exactly what fits still succeeds.

A call is taken from a block only if it will end before the block expires (:meth:`Block.fits`): the
reaper releases a block past its expiry (its worker died) and charges the calls recorded
against it until then (``policies.ledger.reservations_release_expired``); a worker that was
only slow settles it later, and only what the release did not charge is added
(``policies.ledger.ceiling_charge_released``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from policies.errors import InvalidReservation
from policies.ledger import HoldRequest, Settlement, periods_of
from policies.limits import MONEY_QUANTUM
from policies.models import Reservation, ReservationKind, ReservationStatus

__all__ = ["Block"]


def _dec(value: object) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


@dataclass(slots=True)
class Block:
    """A held block and what its worker has taken from it so far (in that worker's memory)."""

    reservation: Reservation
    #: The worst cases of the calls taken from it (made, or in flight).
    taken: Decimal = Decimal(0)
    #: What the calls made from it cost, as their settlement charges them.
    charged: Decimal = Decimal(0)
    #: The calls made from it, as recorded (:meth:`spend`).
    calls: list[Settlement] = field(default_factory=list)
    #: What the block was asked for with (its scopes and periods): a call counting against
    #: other ceilings, or in another period, is not taken from it.
    request: HoldRequest | None = None
    #: The UTC day of ``request.now`` (start, end): a call within it counts in the same
    #: periods (a day's or the month's holding it), found by :meth:`same_periods`.
    _day: tuple[datetime, datetime] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        r = self.reservation
        if r.kind != ReservationKind.BLOCK or r.status != ReservationStatus.HELD:
            raise InvalidReservation(f"reservation {r.pk} is not a held block")

    def same_periods(self, now: datetime) -> bool:
        """Whether a call at ``now`` counts in the same periods as the block (the periods of
        its request's scopes at ``now`` are those it was asked in)."""
        request = self.request
        if request is None:
            return False
        day = self._day
        if day is None:
            start = request.now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            day = self._day = (start, start + timedelta(days=1))
        if day[0] <= now < day[1]:
            return True
        return periods_of(request.scopes, now) == request.periods

    @property
    def amount(self) -> Decimal:
        return _dec(self.reservation.amount)

    @property
    def left(self) -> Decimal:
        return self.amount - self.taken

    def fits(self, worst: Decimal, now: datetime, span: timedelta) -> bool:
        """Whether a call of ``worst`` may be taken: it fits what is left, and ``span`` (how
        long the call may take until its completion is written: the life its own reservation
        would have) ends before the block expires."""
        return worst <= self.left and now + span <= self.reservation.expires_at

    def take(self, worst: Decimal, now: datetime, span: timedelta) -> bool:
        """Take ``worst`` for a call about to be made, if it :meth:`fits`."""
        if worst < 0 or not self.fits(worst, now, span):
            return False
        self.taken += worst
        return True

    def give_back(self, worst: Decimal) -> None:
        """A call taken but not made: its worst case is free again."""
        if worst > self.taken:
            raise InvalidReservation(f"block {self.reservation.pk} gave out only {self.taken}")
        self.taken -= worst

    def spend(
        self,
        *,
        step_id: int | None,
        action: str,
        worst: Decimal,
        actual: Decimal | None,
    ) -> Settlement:
        """The call taken for ``worst`` was made and cost ``actual`` (None: it reported no
        usage): its record, to write with the step's completion
        (``policies.ledger.settlement_statements``) or on its own
        (``policies.ledger.settlement_apply``). It moves no scope row."""
        r = self.reservation
        if worst < 0 or (actual is not None and actual < 0):
            raise InvalidReservation("a call's worst case and cost are not negative")
        call = Settlement(
            r.id,
            worst.quantize(MONEY_QUANTUM),
            None if actual is None else actual.quantize(MONEY_QUANTUM),
            (),
            r.run_id,
            step_id,
            block=True,
            action=action[:200],
            owner=r.owner,
        )
        self.charged += call.charged
        self.calls.append(call)
        return call

    def settlement(self) -> Settlement:
        """Settling the block: the sum of its calls enters ``spent`` and the whole amount leaves
        ``reserved``, in every scope; with no call made, it is released."""
        r = self.reservation
        return Settlement(
            r.id,
            self.amount,
            self.charged if self.calls else None,
            tuple(r.scope_ids),
            r.run_id,
            r.step_id,
        )
