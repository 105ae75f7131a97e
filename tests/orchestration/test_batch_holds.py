"""A reservation made with the statements a worker puts in its claim's batch
(``PgWriteBatch.hold``, ``policies.ledger.hold_statements``): the common answer carries no
rows' states, and the process still learns the run's new scope row, so the run's next
reservation addresses every row by id."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from orchestration.store.postgresql import PostgresStore
from policies import ledger
from policies.ledger import HoldRequest, hold_request, hold_scope_ids
from policies.limits import CeilingScope
from policies.models import ReservationStatus, ScopeKind, SpendScope

pytestmark = pytest.mark.django_db(transaction=True)

GLOBAL = CeilingScope(ScopeKind.GLOBAL_DAY, "", Decimal("10"), Decimal("0.8"))


def _request(run_id: int, amount: str = "0.5") -> HoldRequest:
    run = CeilingScope(ScopeKind.RUN, str(run_id), Decimal("2"), Decimal("0.8"))
    return hold_request(
        scopes=[run, GLOBAL],
        amount=Decimal(amount),
        run_id=run_id,
        step_id=None,
        action="agent:noop",
        owner="worker-1",
        ttl=timedelta(minutes=5),
    )


def _hold(request: HoldRequest) -> ledger.Held:
    """The reservation as a worker's batch makes it (``PgWriteBatch.hold``), on its own."""
    batch = PostgresStore().batch()
    batch.hold(0, request)
    batch.run()
    held = batch.held(0)
    assert held is not None
    return held


@pytest.fixture(autouse=True)
def _forget_scope_rows() -> None:
    ledger._scope_ids.clear()


def test_a_runs_new_scope_row_is_learnt_from_a_hold_that_returned_no_states() -> None:
    first = _hold(_request(41))  # neither row known: looked up by name, states returned
    assert first.reservation is not None and first.states
    second_request = _request(42)
    assert hold_scope_ids(second_request) is None  # run 42's row is new to this process
    second = _hold(second_request)
    assert second.reservation is not None
    assert second.states == ()  # it fitted, crossing no threshold: nothing to read back
    run_row = SpendScope.objects.get(kind=ScopeKind.RUN, key="42", period_start__isnull=True)
    global_row = SpendScope.objects.get(kind=ScopeKind.GLOBAL_DAY)
    assert hold_scope_ids(_request(42)) == frozenset({run_row.pk, global_row.pk})
    assert run_row.reserved == Decimal("0.5") and global_row.reserved == Decimal("1.0")
    assert second.reservation.status == ReservationStatus.HELD
    assert sorted(second.reservation.scope_ids) == sorted([run_row.pk, global_row.pk])


def test_a_hold_that_crosses_a_soft_threshold_still_reads_the_rows_states() -> None:
    _hold(_request(43))
    crossing = _hold(_request(44, amount="1.7"))  # 85 % of run 44's ceiling of 2
    assert crossing.reservation is not None
    assert {state.kind for state in crossing.states} == {ScopeKind.RUN, ScopeKind.GLOBAL_DAY}
    assert [warning.data["kind"] for warning in crossing.warnings()] == [ScopeKind.RUN]


def test_a_refused_hold_reserves_nothing_and_says_which_ceiling() -> None:
    _hold(_request(45))
    refused = _hold(_request(46, amount="2.5"))  # more than run 46's ceiling of 2
    assert refused.reservation is None and not refused.missing
    assert refused.refused() == 0  # the run's ceiling, the request's first scope
    assert SpendScope.objects.get(kind=ScopeKind.RUN, key="46").reserved == Decimal(0)
