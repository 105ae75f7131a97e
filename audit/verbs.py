"""Audit verbs: a unique integer per verb, numbered in ranges per domain, never renumbered."""

from django.db import models


class Verb(models.IntegerChoices):
    # 100-199: runs
    RUN_SUBMITTED = 100, "run.submitted"
    RUN_STARTED = 101, "run.started"
    RUN_WAITING = 102, "run.waiting"
    RUN_RESUMED = 103, "run.resumed"
    RUN_SUCCEEDED = 104, "run.succeeded"
    RUN_FAILED = 105, "run.failed"
    RUN_CANCELLED = 106, "run.cancelled"
    RUN_LIMIT_HIT = 107, "run.limit_hit"
    RUN_COMPENSATING = 108, "run.compensating"
    RUN_COMPENSATED = 109, "run.compensated"
    RUN_RETRIED = 110, "run.retried_from_step"
    # 200-299: steps
    STEP_CREATED = 200, "step.created"
    STEP_CLAIMED = 201, "step.claimed"
    STEP_SUCCEEDED = 202, "step.succeeded"
    STEP_FAILED = 203, "step.failed"
    STEP_RETRY_SCHEDULED = 204, "step.retry_scheduled"
    STEP_LEASE_EXPIRED = 205, "step.lease_expired"
    STEP_CANCELLED = 206, "step.cancelled"
    STEP_RELEASED = 207, "step.released"
    STEP_SKIPPED = 208, "step.skipped"
    STEP_CONTRACT_VIOLATION = 209, "step.contract_violation"
    STEP_ROUTED = 210, "step.routed"
    STEP_REQUEUED = 211, "step.requeued"
    STEP_FALLBACK = 212, "step.fallback"
    STEP_DEGRADED = 213, "step.degraded"
    STEP_ESCALATED = 214, "step.escalated"
    STEP_TIMED_OUT = 215, "step.timed_out"
    STEP_COMPENSATED = 216, "step.compensated"
    # 300-399: run state
    STATE_WRITTEN = 300, "state.written"
    # 400-499: waits (approvals and outside events)
    WAIT_OPENED = 400, "wait.opened"
    APPROVAL_APPROVED = 401, "approval.approved"
    APPROVAL_REJECTED = 402, "approval.rejected"
    APPROVAL_EDITED = 403, "approval.edited_and_approved"
    WAIT_EXPIRED = 404, "wait.expired"
    EVENT_RECEIVED = 405, "event.received"
    EVENT_APPLIED = 406, "event.applied"
    APPROVAL_STALE = 407, "approval.stale"
    WAIT_CANCELLED = 408, "wait.cancelled"
    ESCALATION_RETRIED = 409, "escalation.retried"
    ESCALATION_SKIPPED = 410, "escalation.skipped"
    ESCALATION_ABORTED = 411, "escalation.aborted"
    APPROVAL_VOTED = 412, "approval.voted"
    WAIT_CLAIMED = 413, "wait.claimed"
    WAIT_RELEASED = 414, "wait.released"
    WAIT_SLA_BREACHED = 415, "wait.sla_breached"
    # 500-599: tool calls (capabilities, providers, circuit breakers)
    TOOL_CALLED = 500, "tool.called"
    TOOL_CALL_FAILED = 501, "tool.call_failed"
    TOOL_CALL_SKIPPED = 502, "tool.call_skipped"
    TOOL_CALL_EXHAUSTED = 503, "tool.exhausted"
    TOOL_CIRCUIT_OPENED = 510, "tool.circuit_opened"
    TOOL_CIRCUIT_HALF_OPENED = 511, "tool.circuit_half_opened"
    TOOL_CIRCUIT_CLOSED = 512, "tool.circuit_closed"
    # 600-699: access (who was refused what)
    ACCESS_DENIED = 600, "access.denied"
    # 700-799: cost (ceilings, reservations, spend)
    CEILING_WARNED = 700, "ceiling.warning"
    CEILING_EXCEEDED = 701, "ceiling.exceeded"
    CEILING_RAISED = 702, "ceiling.raised"
    COST_UNKNOWN = 703, "cost.unknown"
    RESERVATION_RELEASED = 704, "reservation.released"
    # 800-899: policies (versions and their review)
    POLICY_DRAFTED = 800, "policy.drafted"
    POLICY_SUBMITTED = 801, "policy.submitted"
    POLICY_APPROVED = 802, "policy.approved"
    POLICY_REJECTED = 803, "policy.rejected"
    POLICY_ACTIVATED = 804, "policy.activated"
    POLICY_DECIDED = 810, "policy.decided"
    # 900-949: accounts (tokens, sign-in)
    TOKEN_ISSUED = 900, "token.issued"
    TOKEN_REVOKED = 901, "token.revoked"
    LOGIN_LOCKED_OUT = 902, "login.locked_out"
    LOGIN_FAILED = 903, "login.failed"
    # 950-999: notifications and drills
    NOTIFICATION_SENT = 950, "notification.sent"
    NOTIFICATION_FAILED = 951, "notification.failed"
    DRILL_FIRED = 960, "drill.fired"
    DRILL_ACKNOWLEDGED = 961, "drill.acknowledged"


class ActorType(models.TextChoices):
    HUMAN = "human", "human"
    AGENT = "agent", "agent"
    SYSTEM = "system", "system"
