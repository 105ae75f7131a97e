"""Advancing a run: given what was loaded (a :class:`~orchestration.changes.Snapshot`), compute
what one transaction changes (a :class:`~orchestration.changes.Changes`).

This is the deterministic core. It touches no database and sends nothing: the caller loads the
snapshot (``orchestration.store``), writes the changes in one call and sends their messages after
commit (``orchestration.dispatch``). The graph's decisions come from ``orchestration.graph``,
failure handling from ``orchestration.failures`` and compensation from
``orchestration.compensation``; this module applies them to one run: new steps, moves of
existing steps and their counters on the run row, state versions, waits, audit records, live
events and wake-ups.

The entry points are the functions at the bottom (``run_started``, ``step_completed``,
``attempt_failed``, ...); :class:`RunAdvance` is the working state they share.
"""

from orchestration.advance.actions import (
    approval_digest,
    node_of,
    output_contract,
    step_action,
    step_input,
)
from orchestration.advance.entries import (
    approval_decided,
    approval_reopened,
    attempt_failed,
    escalation_resolved,
    event_received,
    lease_expired,
    run_cancelled,
    run_past_deadline,
    run_retried,
    run_started,
    run_step_skipped,
    step_completed,
    wait_expired,
)
from orchestration.advance.flow import RunAdvance

__all__ = [
    "RunAdvance",
    "approval_decided",
    "approval_digest",
    "approval_reopened",
    "attempt_failed",
    "escalation_resolved",
    "event_received",
    "lease_expired",
    "node_of",
    "output_contract",
    "run_cancelled",
    "run_past_deadline",
    "run_retried",
    "run_started",
    "run_step_skipped",
    "step_action",
    "step_completed",
    "step_input",
    "wait_expired",
]
