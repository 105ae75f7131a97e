"""Undoing completed side effects when a run fails or is cancelled (the saga), as pure functions.

A node with an outside side effect declares ``compensate="agent"``. When the run ends badly,
every completed step of such a node gets a compensation step, newest completion first; they run
one at a time, and the run ends (``failed`` or ``cancelled``, with its original error) after the
last. A step an operator skipped never ran its action, so it has nothing to undo.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestration.definition import Node, Workflow
from orchestration.errors import Code

#: Compensation steps are named after the node they undo: ``undo:execute_refund``.
UNDO = "undo:"
#: A step an operator skipped carries this prefix in ``degraded``: it has no side effect to undo.
SKIPPED = "skipped by"


class Completed(Protocol):
    """What compensation planning reads of a completed step."""

    @property
    def node(self) -> str: ...
    @property
    def degraded(self) -> str: ...


@dataclass(frozen=True)
class Undo:
    """One compensation to create: for ``original``, by ``agent``; only the first starts queued."""

    original: Any
    node: Node
    agent: str
    queued: bool


def undo_node_name(node_name: str) -> str:
    return UNDO + node_name


def undone_node(compensation_node: str) -> str:
    """The node a compensation step undoes (``undo:charge`` -> ``charge``)."""
    return compensation_node.removeprefix(UNDO)


def compensations(wf: Workflow, completed_newest_first: Iterable[Completed]) -> list[Undo]:
    """The compensations a failing run needs, in the order they run."""
    undo = [
        s
        for s in completed_newest_first
        if wf.node(s.node).compensate and not s.degraded.startswith(SKIPPED)
    ]
    return [
        Undo(original=s, node=wf.node(s.node), agent=wf.node(s.node).compensate, queued=index == 0)
        for index, s in enumerate(undo)
    ]


def compensation_input(step_key: str, step_input: Any, output: Any, reason: str) -> dict[str, Any]:
    """What a compensating agent is given (``orchestration.agents.base.CompensationInput``)."""
    return {"step": step_key, "input": step_input, "output": output, "reason": reason}


def final_status(error_code: str) -> str:
    """How a run that compensated ends: ``cancelled`` if it was cancelled, else ``failed``."""
    return "cancelled" if error_code == Code.CANCELLED else "failed"


def newest_first(steps: Sequence[Any], trigger: Any | None) -> list[Any]:
    """Completed steps, newest completion first; the step whose success triggered the failure
    (its row is written with this change) counts as the newest."""
    ordered = sorted(steps, key=lambda s: (s.finished_at, s.pk), reverse=True)
    if trigger is None:
        return ordered
    return [trigger, *(s for s in ordered if s.pk != trigger.pk)]
