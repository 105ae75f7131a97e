"""The spend ledger: reserve, settle, release, raise; a hard ceiling is never passed, even with
two processes reserving at once; expired reservations go back to the pool."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connections

from audit.models import AuditEvent
from audit.verbs import Verb
from policies.errors import (
    CeilingExceeded,
    CeilingNotRaised,
    InvalidAmount,
    PolicyDenied,
    ReservationNotFound,
    ReservationReleased,
    ReservationSettled,
)
from policies.ledger import (
    ceiling_charge_released,
    ceiling_raise,
    ceiling_release,
    ceiling_reserve,
    ceiling_settle,
    period_start_for,
    reservations_release_expired,
    reservations_release_for_step,
)
from policies.limits import CeilingScope
from policies.models import Reservation, ReservationStatus, SpendScope
from tests.factories import UserFactory

TTL = timedelta(minutes=5)


def _scopes(run_limit: str = "10", tenant_limit: str = "100") -> list[CeilingScope]:
    return [
        CeilingScope("run", "7", Decimal(run_limit), Decimal("0.8")),
        CeilingScope("tenant_month", "acme", Decimal(tenant_limit), Decimal("0.8")),
    ]


def _reserve(
    amount: str, scopes: list[CeilingScope] | None = None, step_id: int = 1, **kw: object
) -> Reservation:
    return ceiling_reserve(
        scopes=scopes if scopes is not None else _scopes(),
        amount=Decimal(amount),
        run_id=7,
        step_id=step_id,
        action="agent:triage",
        owner="w1",
        ttl=TTL,
        **kw,
    )


def _scope(kind: str) -> SpendScope:
    return SpendScope.objects.get(kind=kind)


@pytest.mark.django_db
def test_reserve_then_settle_moves_reserved_to_spent_in_every_scope():
    reservation = _reserve("3")
    assert (_scope("run").reserved, _scope("tenant_month").reserved) == (Decimal(3), Decimal(3))
    ceiling_settle(reservation.pk, Decimal("1.25"))
    for kind in ("run", "tenant_month"):
        scope = _scope(kind)
        assert (scope.reserved, scope.spent) == (Decimal(0), Decimal("1.25"))
    assert Reservation.objects.get(pk=reservation.pk).status == ReservationStatus.SETTLED


@pytest.mark.django_db
def test_a_reservation_past_the_ceiling_is_refused_naming_the_scope_and_nothing_is_held():
    _reserve("8")
    with pytest.raises(CeilingExceeded) as refused:
        _reserve("3")
    assert refused.value.detail["kind"] == "run"
    assert refused.value.detail["limit"] == "10.000000"
    assert refused.value.detail["reserved"] == "8.000000"
    assert "run ceiling (run 7) is 10" in refused.value.message
    # the tenant scope was not charged for the refused call
    assert _scope("tenant_month").reserved == Decimal(8)
    assert Reservation.objects.count() == 1
    assert AuditEvent.objects.filter(verb=Verb.CEILING_EXCEEDED).count() == 1


@pytest.mark.django_db
def test_the_tenant_ceiling_refuses_when_the_run_has_room():
    with pytest.raises(CeilingExceeded) as refused:
        _reserve("5", _scopes(run_limit="10", tenant_limit="4"))
    assert refused.value.detail["kind"] == "tenant_month"
    assert not SpendScope.objects.filter(kind="run", reserved__gt=0).exists()


@pytest.mark.django_db
def test_double_settle_release_and_unknown_reservation_errors():
    reservation = _reserve("2")
    ceiling_settle(reservation.pk, Decimal("1"))
    ceiling_settle(reservation.pk, Decimal("1"))  # the same actual again: a no-op
    assert _scope("run").spent == Decimal(1)
    with pytest.raises(ReservationSettled):
        ceiling_settle(reservation.pk, Decimal("2"))
    with pytest.raises(ReservationSettled):
        ceiling_release(reservation.pk)
    other = _reserve("2")
    ceiling_release(other.pk)
    ceiling_release(other.pk)  # twice: a no-op
    assert _scope("run").reserved == Decimal(0)
    with pytest.raises(ReservationReleased):
        ceiling_settle(other.pk, Decimal("1"))
    with pytest.raises(ReservationNotFound):
        ceiling_settle(999999, Decimal("1"))


@pytest.mark.django_db
def test_an_overrun_is_recorded_but_only_the_reserved_amount_is_charged():
    reservation = _reserve("2")
    ceiling_settle(reservation.pk, Decimal("2.5"))
    assert _scope("run").spent == Decimal(2)
    assert Reservation.objects.get(pk=reservation.pk).actual == Decimal("2.5")
    event = AuditEvent.objects.get(verb=Verb.CEILING_EXCEEDED, object_type="reservation")
    assert event.data["overrun"] is True


@pytest.mark.django_db
def test_float_and_negative_amounts_are_refused():
    with pytest.raises(InvalidAmount):
        ceiling_reserve(
            scopes=_scopes(),
            amount=1.5,
            run_id=7,
            step_id=1,
            action="a",
            owner="w",
            ttl=TTL,  # type: ignore[arg-type]
        )
    with pytest.raises(InvalidAmount):
        _reserve("-1")


@pytest.mark.django_db
def test_the_soft_threshold_warns_once_per_scope_and_period():
    for _ in range(5):
        _reserve("2", [CeilingScope("run", "7", Decimal("10"), Decimal("0.5"))])
    warned = AuditEvent.objects.filter(verb=Verb.CEILING_WARNED)
    assert warned.count() == 1
    assert warned.get().data["committed"] == "6.000000"
    # going back below the threshold and crossing it again does not warn twice
    for reservation in Reservation.objects.all():
        ceiling_release(reservation.pk)
    for _ in range(4):
        _reserve("2", [CeilingScope("run", "7", Decimal("10"), Decimal("0.5"))])
    assert warned.count() == 1


@pytest.mark.django_db
def test_periods_are_utc_days_and_months():
    now = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert period_start_for("global_day", now) == datetime(2026, 3, 29, tzinfo=UTC)
    assert period_start_for("tenant_month", now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert period_start_for("run", now) is None
    day = [CeilingScope("global_day", "", Decimal("5"), Decimal("0.8"))]
    ceiling_reserve(
        scopes=day, amount=Decimal(5), run_id=1, step_id=1, action="a", owner="w", ttl=TTL, now=now
    )
    # the next day is a new period with the full limit
    ceiling_reserve(
        scopes=day,
        amount=Decimal(5),
        run_id=1,
        step_id=1,
        action="a",
        owner="w",
        ttl=TTL,
        now=now + timedelta(days=1),
    )
    assert SpendScope.objects.filter(kind="global_day").count() == 2


@pytest.mark.django_db
def test_expired_reservations_are_released_by_the_reaper():
    held = _reserve("4")
    live = _reserve("1")
    later = held.expires_at + timedelta(seconds=1)
    Reservation.objects.filter(pk=live.pk).update(expires_at=later + TTL)
    assert reservations_release_expired(later) == 1
    assert Reservation.objects.get(pk=held.pk).status == ReservationStatus.RELEASED
    assert _scope("run").reserved == Decimal(1)
    assert AuditEvent.objects.filter(verb=Verb.RESERVATION_RELEASED).count() == 1
    assert reservations_release_expired(later) == 0


@pytest.mark.django_db
def test_a_lost_attempts_reservation_goes_back_with_its_lease_and_no_other():
    lost = _reserve("4")
    other = _reserve("1", step_id=2)
    assert reservations_release_for_step(1) == 1
    assert Reservation.objects.get(pk=lost.pk).status == ReservationStatus.RELEASED
    assert Reservation.objects.get(pk=other.pk).status == ReservationStatus.HELD
    assert (_scope("run").reserved, _scope("run").spent) == (Decimal(1), Decimal(0))
    [event] = AuditEvent.objects.filter(verb=Verb.RESERVATION_RELEASED)
    assert event.step_id == 1 and event.data["reason"] == "lease_expired"
    assert reservations_release_for_step(1) == 0


@pytest.mark.django_db
def test_a_call_that_finishes_after_its_release_is_charged_anyway():
    lost = _reserve("4")
    reservations_release_for_step(1)
    with pytest.raises(ReservationReleased):
        ceiling_settle(lost.pk, Decimal(3))
    ceiling_charge_released(lost.pk, Decimal(3))
    ceiling_charge_released(lost.pk, Decimal(3))  # a repeat is a no-op
    assert (_scope("run").spent, _scope("run").reserved) == (Decimal(3), Decimal(0))
    assert _scope("tenant_month").spent == Decimal(3)
    settled = Reservation.objects.get(pk=lost.pk)
    assert (settled.status, settled.actual) == (ReservationStatus.SETTLED, Decimal(3))
    [event] = AuditEvent.objects.filter(verb=Verb.CEILING_EXCEEDED, object_type="reservation")
    assert event.data["after_release"] is True and event.data["charged"] == "3.000000"


@pytest.mark.django_db
def test_a_tier_2_operator_raises_a_run_ceiling_and_the_call_then_fits():
    _reserve("8")
    with pytest.raises(CeilingExceeded):
        _reserve("5")
    tier1 = UserFactory(username="t1", permissions=["orchestration.decide_tier_1"])
    tier2 = UserFactory(
        username="t2", permissions=["orchestration.decide_tier_1", "orchestration.decide_tier_2"]
    )
    with pytest.raises(PolicyDenied) as denied:
        ceiling_raise(run_id=7, new_limit=Decimal(20), user=tier1, reason="big ticket")
    assert denied.value.code == "ceiling_tier_required"
    with pytest.raises(CeilingNotRaised):
        ceiling_raise(run_id=7, new_limit=Decimal(10), user=tier2, reason="no-op")
    ceiling_raise(run_id=7, new_limit=Decimal(20), user=tier2, reason="big ticket")
    _reserve("5")
    assert _scope("run").reserved == Decimal(13)
    raised = AuditEvent.objects.get(verb=Verb.CEILING_RAISED, actor_id="t2")
    assert raised.data["to"] == "20.000000" and raised.data["reason"] == "big ticket"


def _reserve_many(
    count: int, kind: str, most: Decimal | None, results: multiprocessing.Queue
) -> None:  # runs in a child process
    connections.close_all()
    ok = refused = 0
    for _ in range(count):
        try:
            ceiling_reserve(
                scopes=[
                    CeilingScope("run", "42", Decimal("50"), Decimal("0.8")),
                    CeilingScope("global_day", "", Decimal("1000"), Decimal("0.8")),
                ],
                amount=Decimal(1),
                run_id=42,
                step_id=1,
                action="agent:x",
                owner="w",
                ttl=TTL,
                kind=kind,
                most=most,
            )
            ok += 1
        except CeilingExceeded:
            refused += 1
    connections.close_all()
    results.put((ok, refused))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("kind", "most"),
    [
        ("call", None),
        # Budget blocks of up to 5 (policies.blocks): 8 of them reach the soft threshold (40),
        # then one call's worth each.
        ("block", Decimal(5)),
    ],
)
def test_two_processes_200_reservations_against_a_ceiling_of_50_never_pass_it(
    kind: str, most: Decimal | None
):
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(100, kind, most, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    made = 50 if most is None else 8 + 10  # 8 blocks of 5, then 10 of one call's worth
    assert sum(ok for ok, _ in outcomes) == made
    assert sum(refused for _, refused in outcomes) == 200 - made
    run = SpendScope.objects.get(kind="run", key="42")
    assert run.reserved + run.spent == Decimal(50) <= run.limit
    assert SpendScope.objects.get(kind="global_day").reserved == Decimal(50)
    assert Reservation.objects.filter(status=ReservationStatus.HELD, kind=kind).count() == made


def _reserve_and_settle_many(count: int, results: multiprocessing.Queue) -> None:  # child process
    """Steps of one run in parallel: each reserves, then settles, against the run and global scopes."""
    connections.close_all()
    failures: list[str] = []
    for _ in range(count):
        try:
            held = ceiling_reserve(
                scopes=[  # the order policies.limits.ceilings_for gives
                    CeilingScope("run", "43", Decimal("1000"), Decimal("0.8")),
                    CeilingScope("global_day", "", Decimal("1000"), Decimal("0.8")),
                ],
                amount=Decimal(2),
                run_id=43,
                step_id=1,
                action="agent:x",
                owner="w",
                ttl=TTL,
            )
            ceiling_settle(held.pk, Decimal(1))
        except Exception as error:  # a deadlock surfaces as an OperationalError
            failures.append(type(error).__name__)
    connections.close_all()
    results.put(failures)


@pytest.mark.django_db(transaction=True)
def test_parallel_steps_of_one_run_reserve_and_settle_without_deadlocking():
    # The global scope's row exists first (lower id) and the run's later: settling must lock the
    # rows in the same order as reserving does, or two parallel steps of a run deadlock.
    ceiling_reserve(
        scopes=[CeilingScope("global_day", "", Decimal("1000"), Decimal("0.8"))],
        amount=Decimal(0),
        run_id=None,
        step_id=None,
        action="agent:x",
        owner="w",
        ttl=TTL,
    )
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_reserve_and_settle_many, args=(150, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    failures = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert failures == [[], []]
    run = SpendScope.objects.get(kind="run", key="43")
    assert (run.reserved, run.spent) == (Decimal(0), Decimal(300))
    assert SpendScope.objects.get(kind="global_day").spent == Decimal(300)


def _write(statements: list[tuple[str, list[object]]]) -> None:
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        for sql, params in statements:
            cursor.execute(sql, params)


@pytest.mark.django_db
def test_a_settlement_written_with_a_completion_moves_the_money_once():
    from policies.ledger import Settlement, settlement_entries, settlement_statements

    held = _reserve("4")
    settlement = Settlement.of(held, Decimal("1.5"))
    now = datetime.now(UTC)
    _write(settlement_statements(settlement, now))
    assert (_scope("run").reserved, _scope("run").spent) == (Decimal(0), Decimal("1.5"))
    assert Reservation.objects.get(pk=held.pk).status == ReservationStatus.SETTLED
    # Written again (a completion committed twice cannot be, but its statements guard it): no-op.
    _write(settlement_statements(settlement, now + timedelta(seconds=1)))
    assert (_scope("run").reserved, _scope("run").spent) == (Decimal(0), Decimal("1.5"))
    assert settlement_entries(settlement) == []
    # Nothing reported: the money goes back, the reservation is released.
    nothing = _reserve("2")
    _write(settlement_statements(Settlement.of(nothing, None), now))
    assert Reservation.objects.get(pk=nothing.pk).status == ReservationStatus.RELEASED
    assert (_scope("tenant_month").reserved, _scope("tenant_month").spent) == (0, Decimal("1.5"))


@pytest.mark.django_db
def test_a_settlement_of_a_reservation_the_reaper_released_moves_nothing():
    from policies.ledger import Settlement, settlement_apply, settlement_statements

    held = _reserve("4")
    ceiling_release(held.pk)  # the reaper took the attempt for dead
    settlement = Settlement.of(held, Decimal(3))
    _write(settlement_statements(settlement, datetime.now(UTC)))
    assert (_scope("run").reserved, _scope("run").spent) == (Decimal(0), Decimal(0))
    # Settled on its own instead (the completion was refused): the call's cost is charged.
    settlement_apply(settlement)
    assert _scope("run").spent == Decimal(3)
    assert Reservation.objects.get(pk=held.pk).status == ReservationStatus.SETTLED
