"""A run's budget block: several calls' worth reserved at once, taken call by call in memory,
each call recorded on its own, the block's settlement charging their sum; a hard ceiling is
still never passed, and the reaper charges what a dead worker's block had spent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction

from audit.models import AuditEvent
from audit.verbs import Verb
from policies.blocks import Block
from policies.errors import CeilingExceeded, InvalidReservation
from policies.ledger import (
    ceiling_release,
    ceiling_reserve,
    reservations_release_expired,
    settlement_apply,
    settlement_entries,
    settlement_statements,
)
from policies.limits import CeilingScope
from policies.models import Reservation, ReservationKind, ReservationStatus, SpendScope

TTL = timedelta(minutes=5)
SPAN = timedelta(seconds=90)


def _scopes(run_limit: str = "10") -> list[CeilingScope]:
    return [
        CeilingScope("run", "7", Decimal(run_limit), Decimal("0.8")),
        CeilingScope("global_day", "", Decimal("100"), Decimal("0.8")),
    ]


def _reserve(
    amount: str, kind: str = ReservationKind.CALL, most: str | None = None, **kw: object
) -> Reservation:
    return ceiling_reserve(
        scopes=_scopes(**kw),  # type: ignore[arg-type]
        amount=Decimal(amount),
        run_id=7,
        step_id=1,
        action="agent:triage",
        owner="w1",
        ttl=TTL,
        kind=kind,
        most=None if most is None else Decimal(most),
    )


def _block(amount: str, **kw: object) -> Block:
    return Block(_reserve(amount, ReservationKind.BLOCK, **kw))


def _money(kind: str) -> tuple[Decimal, Decimal]:
    scope = SpendScope.objects.get(kind=kind)
    return scope.reserved, scope.spent


def _call(block: Block, worst: str, actual: str | None, step_id: int) -> None:
    assert block.take(Decimal(worst), datetime.now(UTC), SPAN)
    settlement_apply(  # written on its own, as when the step's completion is not
        block.spend(
            step_id=step_id,
            action="agent:triage",
            worst=Decimal(worst),
            actual=None if actual is None else Decimal(actual),
        )
    )


@pytest.mark.django_db
def test_a_blocks_calls_move_no_scope_until_its_settlement_charges_their_sum():
    block = _block("5")
    assert _money("run") == _money("global_day") == (Decimal(5), Decimal(0))

    _call(block, "2", "1.5", step_id=1)
    _call(block, "2", "3", step_id=2)  # an overrun: only its worst case is charged
    assert not block.take(Decimal(2), datetime.now(UTC), SPAN)  # 1 left
    assert _money("run") == (Decimal(5), Decimal(0))  # the calls wrote no scope row

    settlement_apply(block.settlement())
    assert _money("run") == _money("global_day") == (Decimal(0), Decimal("3.5"))
    settled = Reservation.objects.get(pk=block.reservation.pk)
    assert (settled.status, settled.actual) == (ReservationStatus.SETTLED, Decimal("3.5"))
    calls = Reservation.objects.filter(block_id=block.reservation.pk).order_by("step_id")
    assert [(c.step_id, c.actual, c.scope_ids, c.status) for c in calls] == [
        (1, Decimal("1.5"), [], ReservationStatus.SETTLED),
        (2, Decimal(3), [], ReservationStatus.SETTLED),
    ]
    [overrun] = AuditEvent.objects.filter(verb=Verb.CEILING_EXCEEDED)
    assert overrun.step_id == 2 and overrun.data["charged"] == "2.000000"


@pytest.mark.django_db
def test_a_block_that_does_not_fit_is_refused_whole_and_a_single_call_still_fits():
    _reserve("8")
    with pytest.raises(CeilingExceeded) as refused:
        _block("5")
    assert refused.value.detail["kind"] == "run"
    assert not Reservation.objects.filter(kind=ReservationKind.BLOCK).exists()
    _reserve("2")  # exactly what is left
    assert _money("run") == (Decimal(10), Decimal(0))


@pytest.mark.django_db
def test_a_block_is_its_most_where_that_stays_under_every_soft_threshold_else_one_calls_worth():
    # The run's limit is 10 with a soft threshold at 80 %: 8.
    assert _reserve("1", ReservationKind.BLOCK, most="9").amount == Decimal(1)  # 9 would pass 8
    assert _reserve("1", ReservationKind.BLOCK, most="4").amount == Decimal(4)  # 1 + 4 <= 8
    _reserve("3")  # 8 committed
    narrow = _reserve("1", ReservationKind.BLOCK, most="4")
    assert narrow.amount == Decimal(1)  # past the threshold: one call's worth, as it fits
    assert Reservation.objects.get(pk=narrow.pk).amount == Decimal(1)
    assert _money("run") == _money("global_day") == (Decimal(9), Decimal(0))
    with pytest.raises(CeilingExceeded):
        _reserve("2", ReservationKind.BLOCK, most="4")  # not even one call's worth
    assert _money("run") == (Decimal(9), Decimal(0))
    with pytest.raises(InvalidReservation):
        _reserve("2", ReservationKind.CALL, most="4")  # only a block asks for more
    with pytest.raises(InvalidReservation):
        _reserve("2", ReservationKind.BLOCK, most="1")


@pytest.mark.django_db
def test_a_call_is_taken_only_if_it_fits_what_is_left_and_ends_before_the_block_expires():
    block = _block("5")
    now = block.reservation.created_at
    assert block.fits(Decimal(5), now, TTL)
    assert not block.fits(Decimal(5), now + timedelta(seconds=1), TTL)  # it would outlive it
    assert not block.fits(Decimal("5.000001"), now, SPAN)
    assert block.take(Decimal(3), now, SPAN)
    block.give_back(Decimal(3))  # not made after all
    assert block.left == Decimal(5)
    with pytest.raises(InvalidReservation):
        block.give_back(Decimal(1))
    with pytest.raises(InvalidReservation):
        Block(_reserve("1"))  # a call's reservation is not a block


@pytest.mark.django_db
def test_a_block_with_no_call_made_gives_everything_back():
    block = _block("5")
    settlement_apply(block.settlement())
    assert _money("run") == (Decimal(0), Decimal(0))
    assert Reservation.objects.get(pk=block.reservation.pk).status == ReservationStatus.RELEASED


@pytest.mark.django_db
def test_releasing_a_block_still_charges_the_calls_made_from_it():
    block = _block("5")
    _call(block, "2", "1", step_id=1)
    _call(block, "1", None, step_id=2)  # reported no usage: nothing spent
    ceiling_release(block.reservation.pk)
    assert _money("run") == _money("global_day") == (Decimal(0), Decimal(1))


@pytest.mark.django_db
def test_the_reaper_charges_a_dead_workers_block_for_its_calls_and_a_late_settlement_adds_the_rest():
    block = _block("5")
    _call(block, "2", "1", step_id=1)
    later = block.reservation.expires_at + timedelta(seconds=1)
    assert reservations_release_expired(later) == 1
    assert _money("run") == _money("global_day") == (Decimal(0), Decimal(1))
    released = Reservation.objects.get(pk=block.reservation.pk)
    assert (released.status, released.actual) == (ReservationStatus.RELEASED, Decimal(1))

    # The worker was only slow: a second call's record lands, then the block's settlement.
    _call(block, "2", "1.5", step_id=2)
    settlement_apply(block.settlement())
    assert _money("run") == (Decimal(0), Decimal("2.5"))  # 1 at the release, 1.5 now
    [late] = AuditEvent.objects.filter(verb=Verb.CEILING_EXCEEDED, data__after_release=True)
    assert late.data["charged"] == "1.500000"
    settlement_apply(block.settlement())  # a repeat charges nothing more
    assert _money("run") == (Decimal(0), Decimal("2.5"))


@pytest.mark.django_db
def test_a_calls_record_goes_in_the_callers_transaction_and_rolls_back_with_it():
    block = _block("5")
    assert block.take(Decimal(1), datetime.now(UTC), SPAN)
    call = block.spend(step_id=3, action="agent:triage", worst=Decimal(1), actual=Decimal(2))
    with pytest.raises(RuntimeError), transaction.atomic():
        with connection.cursor() as cursor:
            for sql, params in settlement_statements(call, datetime.now(UTC)):
                cursor.execute(sql, params)
        raise RuntimeError("the completion failed")
    assert not Reservation.objects.filter(block_id=block.reservation.pk).exists()
    assert [e.verb for e in settlement_entries(call)] == [Verb.CEILING_EXCEEDED]
    with transaction.atomic(), connection.cursor() as cursor:
        for sql, params in settlement_statements(call, datetime.now(UTC)):
            cursor.execute(sql, params)
    [row] = Reservation.objects.filter(block_id=block.reservation.pk)
    assert (row.amount, row.actual, row.step_id) == (Decimal(1), Decimal(2), 3)
    assert SpendScope.objects.get(kind="run").spent == 0  # the block's settlement charges it
