"""A run's audit events as sentences a person reads ("Approved by ana", "Retried after
provider_timeout"), with the actor as a person, an agent or "worker" (its process id on hover)."""

from __future__ import annotations

from typing import Any

from audit.verbs import ActorType, Verb

#: Verb → sentence; ``{who}`` is the actor, ``{step}`` the step, ``{d[...]}`` the event's data.
SENTENCES: dict[int, str] = {
    Verb.RUN_SUBMITTED: "Submitted by {who}",
    Verb.RUN_STARTED: "Run started",
    Verb.RUN_WAITING: "Run waiting",
    Verb.RUN_RESUMED: "Run resumed",
    Verb.RUN_SUCCEEDED: "Run finished successfully",
    Verb.RUN_FAILED: "Run failed: {code}",
    Verb.RUN_CANCELLED: "Cancelled by {who}",
    Verb.RUN_LIMIT_HIT: "Run stopped by its {d_bound} limit",
    Verb.RUN_COMPENSATING: "Undoing completed steps",
    Verb.RUN_COMPENSATED: "Completed steps undone",
    Verb.RUN_RETRIED: "Retried from {step} by {who}",
    Verb.STEP_CREATED: "{step} queued",
    Verb.STEP_CLAIMED: "{step} picked up by {who}",
    Verb.STEP_SUCCEEDED: "{step} done",
    Verb.STEP_FAILED: "{step} failed: {code}",
    Verb.STEP_RETRY_SCHEDULED: "{step} retried after {code}",
    Verb.STEP_LEASE_EXPIRED: "{step}: its worker stopped answering; taken back",
    Verb.STEP_CANCELLED: "{step} cancelled",
    Verb.STEP_SKIPPED: "{step} skipped by {who} with a supplied value",
    Verb.STEP_CONTRACT_VIOLATION: "{step} produced output that breaks its contract",
    Verb.STEP_ROUTED: "{step} chose the next step",
    Verb.STEP_FALLBACK: "{step} handed to its fallback agent",
    Verb.STEP_DEGRADED: "{step} finished with a partial result",
    Verb.STEP_ESCALATED: "{step} escalated to a person",
    Verb.STEP_TIMED_OUT: "{step} timed out",
    Verb.STEP_COMPENSATED: "{step} undone",
    Verb.STATE_WRITTEN: "State written by {step}",
    Verb.WAIT_OPENED: "{step} waiting for a person or an event",
    Verb.APPROVAL_APPROVED: "Approved by {who}",
    Verb.APPROVAL_REJECTED: "Rejected by {who}",
    Verb.APPROVAL_EDITED: "Edited and approved by {who}",
    Verb.APPROVAL_VOTED: "Vote from {who}",
    Verb.WAIT_EXPIRED: "{step}: nobody answered in time",
    Verb.EVENT_RECEIVED: "Outside event received",
    Verb.ESCALATION_RETRIED: "{step} retried by {who} after escalation",
    Verb.ESCALATION_SKIPPED: "{step} skipped by {who} with a supplied value",
    Verb.ESCALATION_ABORTED: "Run aborted by {who} at {step}",
    Verb.TOOL_CALLED: "{step} called a tool",
    Verb.TOOL_CALL_FAILED: "{step}: a tool call failed",
    Verb.ACCESS_DENIED: "{who} was refused",
    Verb.POLICY_DECIDED: "Policy decided {d_outcome} for {step}",
}


def actor(event: Any) -> tuple[str, str]:
    """(name shown, hover text): a person by name, an agent as "agent …", anything else as
    "worker" with its process id on hover."""
    if event.actor_type == ActorType.HUMAN:
        return event.actor_id or "someone", "a person"
    if event.actor_type == ActorType.AGENT:
        return f"agent {event.actor_id}", "an agent"
    return "worker" if event.actor_id else "the system", event.actor_id or ""


def sentence(event: Any, step_key: str = "") -> str:
    data = event.data if isinstance(event.data, dict) else {}
    template = SENTENCES.get(event.verb)
    if template is None:
        return event.get_verb_display()
    who, _ = actor(event)
    fields = {
        "who": who,
        "step": step_key or "a step",
        "code": data.get("code") or data.get("error_code") or "an error",
        "d_bound": data.get("bound", "a"),
        "d_outcome": data.get("outcome", "?"),
    }
    text = template.format(**fields)
    return text[0].upper() + text[1:]
