"""A worker chain's budget blocks (``Chain``'s bookkeeping of ``policies.blocks``): every block
the chain made is settled once, for exactly the calls taken from it, even a run's earlier block
whose call was still in flight when the run's next block was made."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from django.utils import timezone

from orchestration.models import Step
from orchestration.worker.chain import Chain
from orchestration.worker.costs import _WORST_ON_STEP, CallWorst
from policies.ledger import Held, ceiling_reserve, hold_request, settlement_apply
from policies.limits import CeilingScope
from policies.models import Reservation, ReservationKind, ReservationStatus, SpendScope
from tests.conftest import ALL_POOLS
from tests.support.engine import runtime_for

pytestmark = pytest.mark.django_db

SCOPES = (
    CeilingScope("run", "7", Decimal("10"), Decimal("0.8")),
    CeilingScope("global_day", "", Decimal("100"), Decimal("0.8")),
)
WORST = Decimal("1")


class Answered:
    """A batch that was read: its answer to the block asked for ``step_id``."""

    def __init__(self, step_id: int) -> None:
        asked: dict[str, Any] = {
            "scopes": SCOPES,
            "amount": WORST,
            "run_id": 7,
            "step_id": step_id,
            "action": "agent:x",
            "owner": "w1",
            "ttl": timedelta(minutes=5),
            "kind": ReservationKind.BLOCK,
            "most": 4 * WORST,
        }
        self.answer = Held(hold_request(**asked), ceiling_reserve(**asked), (), matched=True)

    def held(self, step_id: int) -> Held:
        return self.answer


def _chain() -> Chain:
    def never(*args: Any) -> Any:
        raise AssertionError("nothing is committed in this test")

    return Chain("w1", runtime_for(ALL_POOLS), recommit=never, commit_failed=never)


def _spent(chain: Chain, step_id: int, cost: str) -> None:
    step = Step(pk=step_id, agent="x")
    settlement_apply(chain.spend(step, lambda worst: Decimal(cost)))


def test_a_chain_settles_every_block_it_made_once_for_the_calls_taken_from_it() -> None:
    chain = _chain()
    chain.holds[1] = Answered(1)  # type: ignore[assignment]
    first = chain.take_held(Step(pk=1, agent="x"))
    assert first is not None and first.reservation is not None
    # Step 1's call is still in flight when step 2's claim answers with the run's next block.
    chain.holds[2] = Answered(2)  # type: ignore[assignment]
    second = chain.take_held(Step(pk=2, agent="x"))
    assert second is not None and second.reservation is not None
    assert chain.close_block(7) is None  # the newer block has a call in flight too
    _spent(chain, 1, "0.25")
    _spent(chain, 2, "0.5")
    assert SpendScope.objects.get(kind="run").reserved == 8 * WORST

    chain.close()
    # Both wait to be settled with others: still held, their whole amounts still counted.
    assert len(chain.rt.settling) == 2
    assert SpendScope.objects.get(kind="run").reserved == 8 * WORST
    chain.rt.settling.flush()

    blocks = Reservation.objects.filter(kind=ReservationKind.BLOCK).order_by("step_id")
    assert [(b.status, b.actual) for b in blocks] == [
        (ReservationStatus.SETTLED, Decimal("0.25")),
        (ReservationStatus.SETTLED, Decimal("0.5")),
    ]
    for kind in ("run", "global_day"):
        scope = SpendScope.objects.get(kind=kind)
        assert (scope.reserved, scope.spent) == (0, Decimal("0.75"))
    chain.close()  # a second close settles nothing again
    chain.rt.settling.flush()
    assert SpendScope.objects.get(kind="run").spent == Decimal("0.75")


def test_a_call_given_back_leaves_its_block_to_be_released_whole() -> None:
    chain = _chain()
    chain.holds[1] = Answered(1)  # type: ignore[assignment]
    found = chain.take_held(Step(pk=1, agent="x"))
    chain.unused(1, found)  # the call was not made after all
    settlement = chain.close_block(7)
    assert settlement is not None and settlement.actual is None
    settlement_apply(settlement)
    chain.close()
    [block] = Reservation.objects.filter(kind=ReservationKind.BLOCK)
    assert block.status == ReservationStatus.RELEASED
    assert SpendScope.objects.get(kind="run").reserved == 0
    assert timezone.now() < block.expires_at


def test_a_call_taken_from_the_block_is_its_reservation_only_under_the_version_that_took_it() -> (
    None
):
    chain = _chain()
    chain.holds[1] = Answered(1)  # type: ignore[assignment]
    first = chain.take_held(Step(pk=1, agent="x", run_id=7))
    assert first is not None and first.reservation is not None
    block = first.reservation
    now = timezone.now()
    worst = CallWorst(SCOPES, WORST, timedelta(minutes=1))
    taken_under, changed_to = SimpleNamespace(compiled=object()), SimpleNamespace(compiled=object())

    step = Step(pk=2, agent="x", run_id=7)
    step.__dict__[_WORST_ON_STEP] = (taken_under.compiled, worst)  # what call_worst answered
    assert chain.share(step, worst, now)
    # Asked under another version (activated meanwhile), the block does not answer for it...
    assert chain.shared(step, changed_to) is None  # type: ignore[arg-type]
    # ...under the version that took it, it does, once.
    assert chain.shared(step, taken_under) == block  # type: ignore[arg-type]
    assert chain.shared(step, taken_under) is None  # type: ignore[arg-type]
    assert chain.take_held(step) is None

    # A call taken under a version no longer in force is answered by the block as a share of
    # the call's worst case, which the step's reservation then checks against the new worst.
    later = Step(pk=3, agent="x", run_id=7)
    later.__dict__[_WORST_ON_STEP] = (taken_under.compiled, worst)
    assert chain.share(later, worst, now)
    assert chain.shared(later, changed_to) is None  # type: ignore[arg-type]
    held = chain.take_held(later)
    assert held is not None and held.reservation == block and held.covers == WORST

    for step_id, cost in ((1, "0.25"), (2, "0.5"), (3, "0.125")):
        _spent(chain, step_id, cost)
    chain.close()
    chain.rt.settling.flush()
    block.refresh_from_db()
    assert (block.status, block.actual) == (ReservationStatus.SETTLED, Decimal("0.875"))
    assert SpendScope.objects.get(kind="run").spent == Decimal("0.875")
