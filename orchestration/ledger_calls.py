"""The model calls a step's successful attempt took from a budget block, kept on its step row.

Each call made from a block (``policies.blocks``) must be recorded durably with the work it
paid for: a block released by the reaper (its worker died) charges the calls made from it. A
ledger row per call cost its own INSERT and index entries in every completion; the completion
writes the step row anyway, so the call travels in that same statement as ``Step.block_call``.
The ledger finds these through the source registered here (``policies.calls``): the reaper's
charge for a released block, and the calls listed with a run's reservations.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from orchestration.models import Step
from policies.calls import RecordedCall, call_source_add
from policies.ledger import Settlement

__all__ = ["StepCalls", "block_call_value", "register"]


def block_call_value(settlement: Settlement) -> dict[str, Any]:
    """``Step.block_call`` for a call made from a block (``settlement.block``)."""
    return {
        "block": settlement.reservation_id,
        "worst": str(settlement.amount),
        "cost": None if settlement.actual is None else str(settlement.actual),
    }


def _recorded(step: Step) -> RecordedCall | None:
    call = step.block_call
    if not isinstance(call, dict) or not isinstance(call.get("block"), int):
        return None
    cost = call.get("cost")
    return RecordedCall(
        block_id=call["block"],
        run_id=step.run_id,
        step_id=step.pk,
        action=f"agent:{step.agent}",
        worst=Decimal(str(call.get("worst", "0"))),
        actual=None if cost is None else Decimal(str(cost)),
        at=step.finished_at or step.created_at,
    )


class StepCalls:
    """The calls recorded on step rows (a ``policies.calls.CallSource``)."""

    fields = ("id", "run_id", "agent", "block_call", "finished_at", "created_at")

    def charged(self, blocks: Mapping[int, int | None]) -> dict[int, Decimal]:
        runs = {run_id for run_id in blocks.values() if run_id is not None}
        steps = Step.objects.filter(run_id__in=runs, block_call__isnull=False).only(*self.fields)
        out: dict[int, Decimal] = {}
        for step in steps:
            call = _recorded(step)
            if call is not None and call.block_id in blocks:
                out[call.block_id] = out.get(call.block_id, Decimal(0)) + call.charged
        return out

    def of_run(self, run_id: int) -> list[RecordedCall]:
        steps = (
            Step.objects.filter(run_id=run_id, block_call__isnull=False)
            .only(*self.fields)
            .order_by("id")
        )
        return [call for call in map(_recorded, steps) if call is not None]


_source = StepCalls()


def register() -> None:
    """Let the ledger find the calls recorded on step rows (once the app is loaded)."""
    call_source_add(_source)
