"""Calls made from budget blocks that are recorded outside the ledger's own table.

A call taken from a block (``policies.blocks``) moves no scope row; it only has to be recorded,
durably and with the work it paid for, so that a block released by the reaper still charges
the calls made from it. The engine records the call of a successful attempt on its step's row,
in the statement that completes the step (``orchestration.ledger_calls``): no row or statement
of its own. Calls recorded any other way (an attempt whose completion was not written) are
rows of the ledger's table, ``kind=call`` with their ``block_id``.

The engine sits above this app, so the ledger cannot read its steps; the engine hands a
:class:`CallSource` in when its app loads (:func:`call_source_add`), and the ledger asks
every source (:func:`charged_elsewhere`, :func:`recorded_for_run`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol

__all__ = ["CallSource", "RecordedCall", "call_source_add", "charged_elsewhere", "recorded_for_run"]


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One call made from a block, as its source recorded it."""

    block_id: int
    run_id: int | None
    step_id: int | None
    action: str
    #: The worst case taken from the block for it, and what it cost (None: no usage reported).
    worst: Decimal
    actual: Decimal | None
    at: datetime

    @property
    def charged(self) -> Decimal:
        """What it counts in ``spent``: at most its worst case, as a settlement charges."""
        return Decimal(0) if self.actual is None else min(self.actual, self.worst)


class CallSource(Protocol):
    def charged(self, blocks: Mapping[int, int | None]) -> dict[int, Decimal]:
        """What the calls recorded against each block cost (``blocks``: block id -> its run
        id); blocks with none recorded may be left out."""
        ...

    def of_run(self, run_id: int) -> list[RecordedCall]:
        """The calls recorded for run ``run_id``, oldest first."""
        ...


_sources: list[CallSource] = []


def call_source_add(source: CallSource) -> None:
    """Register ``source`` (once per process; adding the same source again does nothing)."""
    if source not in _sources:
        _sources.append(source)


def charged_elsewhere(blocks: Mapping[int, int | None]) -> dict[int, Decimal]:
    """What every source recorded against each of ``blocks`` (block id -> run id)."""
    total: dict[int, Decimal] = {}
    if not blocks:
        return total
    for source in _sources:
        for block_id, amount in source.charged(blocks).items():
            total[block_id] = total.get(block_id, Decimal(0)) + amount
    return total


def recorded_for_run(run_id: int) -> list[RecordedCall]:
    """Every source's calls for run ``run_id``."""
    return [call for source in _sources for call in source.of_run(run_id)]
