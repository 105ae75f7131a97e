"""Budget blocks settled several at a time (``orchestration.settling`` and
``policies.ledger.settlements_apply``): every scope row moves once by the sums, exactly; a
block the reaper released meanwhile moves nothing; what waits is written by the background
thread after its delay, or at once when the process stops."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestration.settling import BlockSettlements
from policies.blocks import Block
from policies.ledger import Settlement, ceiling_release, ceiling_reserve, settlements_apply
from policies.limits import CeilingScope
from policies.models import Reservation, ReservationKind, ReservationStatus, SpendScope
from tests.conftest import wait_until

GLOBAL = CeilingScope("global_day", "", Decimal("100"), Decimal("0.8"))
WORST = Decimal("1")


def _block(run_id: int, *, spent: list[str]) -> Settlement:
    """A block of four calls' worth for ``run_id``, with calls of these costs made from it."""
    scopes = (CeilingScope("run", str(run_id), Decimal("10"), Decimal("0.8")), GLOBAL)
    reservation = ceiling_reserve(
        scopes=scopes,
        amount=WORST,
        run_id=run_id,
        step_id=None,
        action="agent:x",
        owner="w1",
        ttl=timedelta(minutes=5),
        kind=ReservationKind.BLOCK.value,
        most=4 * WORST,
    )
    block = Block(reservation)
    for cost in spent:
        assert block.take(WORST, reservation.created_at, timedelta(0))
        block.spend(step_id=None, action="agent:x", worst=WORST, actual=Decimal(cost))
    return block.settlement()


def _scope(run_id: int | None) -> SpendScope:
    if run_id is None:
        return SpendScope.objects.get(kind="global_day")
    return SpendScope.objects.get(kind="run", key=str(run_id))


@pytest.mark.django_db
def test_blocks_settled_together_move_each_scope_once_by_their_sums() -> None:
    settlements = [_block(1, spent=["0.25", "0.5"]), _block(2, spent=["1"]), _block(3, spent=[])]
    assert _scope(None).reserved == 12 * WORST

    with CaptureQueriesContext(connection) as queries:
        settlements_apply(settlements)

    if connection.vendor == "postgresql":  # one statement for the lot
        assert len([q for q in queries if q["sql"].startswith("EXECUTE")]) == 1
    blocks = Reservation.objects.filter(kind=ReservationKind.BLOCK).order_by("run_id")
    assert [(b.status, b.actual) for b in blocks] == [
        (ReservationStatus.SETTLED, Decimal("0.75")),
        (ReservationStatus.SETTLED, Decimal("1")),
        (ReservationStatus.RELEASED, None),  # no call made: all of it back
    ]
    assert [(_scope(r).reserved, _scope(r).spent) for r in (1, 2, 3)] == [
        (0, Decimal("0.75")),
        (0, Decimal("1")),
        (0, 0),
    ]
    assert (_scope(None).reserved, _scope(None).spent) == (0, Decimal("1.75"))


@pytest.mark.django_db
def test_a_block_the_reaper_released_meanwhile_is_left_as_it_is() -> None:
    kept, reaped = _block(1, spent=["0.5"]), _block(2, spent=["0.25"])
    ceiling_release(reaped.reservation_id)  # what the reaper does past a block's expiry

    settlements_apply([kept, reaped])

    assert Reservation.objects.get(pk=reaped.reservation_id).status == ReservationStatus.RELEASED
    assert (_scope(2).reserved, _scope(2).spent) == (0, 0)
    assert (_scope(1).reserved, _scope(1).spent) == (0, Decimal("0.5"))
    assert (_scope(None).reserved, _scope(None).spent) == (0, Decimal("0.5"))


def test_take_hands_over_all_of_them_once_enough_wait() -> None:
    written: list[list[Settlement]] = []
    waiting = BlockSettlements(apply=written.append)
    first, second = (Settlement(i, WORST, WORST, (), i, None) for i in (1, 2))
    waiting.add(first, 60)
    assert waiting.take(2) == []
    waiting.add(second, 60)
    assert waiting.take(2) == [first, second]
    assert waiting.take(1) == [] and len(waiting) == 0
    waiting.add(first, 60)
    waiting.flush()  # the process stops: written at once
    assert written == [[first]]


@pytest.mark.django_db(transaction=True)
def test_what_waits_is_settled_by_the_background_thread_after_its_delay() -> None:
    settlement = _block(1, spent=["0.5"])
    waiting = BlockSettlements()
    waiting.add(settlement, 0.2)
    assert Reservation.objects.get(pk=settlement.reservation_id).status == ReservationStatus.HELD

    wait_until(
        lambda: (
            Reservation.objects.get(pk=settlement.reservation_id).status
            == ReservationStatus.SETTLED
        ),
        timeout=5,
        what="the background settlement",
    )
    assert (_scope(None).reserved, _scope(None).spent) == (0, Decimal("0.5"))
    assert len(waiting) == 0
