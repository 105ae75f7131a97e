"""Engine errors with stable codes and a class.

The class decides what the engine does with a failure: ``transient`` is retried with backoff,
``permanent``, ``contract`` and ``policy`` are not. Codes are stable strings that API clients and
operators can rely on; never rename one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorClass(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONTRACT = "contract"
    POLICY = "policy"
    LIMIT = "limit"


class Code(StrEnum):
    """Every error code the engine, its services and its tools raise or record. Stable: API
    clients and operators branch on them; never rename or reuse one."""

    # generic, one per error class
    ERROR = "error"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONTRACT_VIOLATION = "contract_violation"
    LIMIT_EXCEEDED = "limit_exceeded"
    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    CONFLICT = "conflict"
    INVALID_INPUT = "invalid_input"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # registries
    UNKNOWN_WORKFLOW = "unknown_workflow"
    UNKNOWN_AGENT = "unknown_agent"
    UNKNOWN_CAPABILITY = "unknown_capability"
    # an attempt of a step
    STEP_TIMEOUT = "step_timeout"
    STEP_HARD_TIMEOUT = "step_hard_timeout"
    AGENT_EXCEPTION = "agent_exception"
    COMMIT_FAILED = "commit_failed"
    LEASE_EXPIRED = "lease_expired"
    NO_TOOL_ACCESS = "no_tool_access"
    # contracts (typed hand-offs)
    INPUT_CONTRACT = "input_contract"
    OUTPUT_CONTRACT = "output_contract"
    DEGRADED_CONTRACT = "degraded_contract"
    STATE_ACCESS_DENIED = "state_access_denied"
    # bounds
    MAX_STEPS = "max_steps"
    MAX_ATTEMPTS = "max_attempts"
    RETRY_WINDOW = "retry_window"
    LOOP_LIMIT = "loop_limit"
    FANOUT_LIMIT = "fanout_limit"
    RUN_DEADLINE = "run_deadline"
    ESCALATION_EXPIRED = "escalation_expired"
    # the graph
    ROUTE_ERROR = "route_error"
    ROUTE_FAILED = "route_failed"
    ROUTE_INVALID_TARGET = "route_invalid_target"
    ROUTE_INVALID_CHOICE = "route_invalid_choice"
    MAP_ITEMS_INVALID = "map_items_invalid"
    WAIT_TIMEOUT = "wait_timeout"
    # people's decisions
    APPROVAL_REJECTED = "approval_rejected"
    POLICY_DENIED = "policy_denied"
    EDIT_DENIED_BY_POLICY = "edit_denied_by_policy"
    EDIT_NEEDS_HIGHER_TIER = "edit_needs_higher_tier"
    APPROVAL_EXPIRED = "approval_expired"
    ABORTED = "aborted"
    CANCELLED = "cancelled"
    # services, to API clients
    RUN_NOT_FOUND = "run_not_found"
    APPROVAL_NOT_FOUND = "approval_not_found"
    ESCALATION_NOT_FOUND = "escalation_not_found"
    RUN_TERMINAL = "run_terminal"
    RUN_COMPENSATING = "run_compensating"
    RUN_NOT_FAILED = "run_not_failed"
    RUN_NOT_RETRYABLE = "run_not_retryable"
    ALREADY_DECIDED = "already_decided"
    INVALID_DECISION = "invalid_decision"
    INVALID_ACTION = "invalid_action"
    EDITED_INPUT_MISSING = "edited_input_missing"
    EDITED_INPUT_UNEXPECTED = "edited_input_unexpected"
    OUTPUT_MISSING = "output_missing"
    OUTPUT_UNEXPECTED = "output_unexpected"
    INVALID_CURSOR = "invalid_cursor"
    REASON_REQUIRED = "reason_required"
    UNSTORABLE_VALUE = "unstorable_value"
    IDEMPOTENCY_KEY_MISMATCH = "idempotency_key_mismatch"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    EVENT_ID_REUSED = "event_id_reused"
    SUBMIT_DENIED = "submit_denied"
    DECIDE_DENIED = "decide_denied"
    VIEW_DENIED = "view_denied"
    TIER_TOO_LOW = "tier_too_low"
    SELF_APPROVAL = "self_approval"
    ALREADY_VOTED = "already_voted"
    EDIT_NEEDS_SINGLE_APPROVAL = "edit_needs_single_approval"
    UNKNOWN_TENANT = "unknown_tenant"
    TENANT_DENIED = "tenant_denied"
    WAIT_NOT_FOUND = "wait_not_found"
    CLAIMED_BY_SOMEONE_ELSE = "claimed_by_someone_else"
    WAIT_NOT_OPEN = "wait_not_open"
    # tools: provider failures, as classified (orchestration.tools.classify)
    TOOL_CALL_FAILED = "tool_call_failed"
    TOOL_PARAMS_CONTRACT = "tool_params_contract"
    RESULT_CONTRACT = "result_contract"
    IDEMPOTENCY_KEY_REQUIRED = "idempotency_key_required"
    CIRCUIT_OPEN = "circuit_open"
    RATE_LIMITED = "rate_limited"
    LIMITS_UNAVAILABLE = "limits_unavailable"
    TIME_BUDGET_EXHAUSTED = "time_budget_exhausted"
    CONNECTION_ERROR = "connection_error"
    PROVIDER_ERROR = "provider_error"
    PROVIDER_EXCEPTION = "provider_exception"
    PROVIDER_NOT_CONFIGURED = "provider_not_configured"
    PROVIDER_PERMISSION_DENIED = "provider_permission_denied"
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_THROTTLED = "provider_throttled"
    PROVIDER_TIMEOUT = "provider_timeout"
    # the spend ledger, before an agent calls a model
    COST_UNKNOWN = "cost_unknown"
    CEILING_EXCEEDED = "ceiling_exceeded"


class SignalboxError(Exception):
    """Base for every error the engine raises on purpose."""

    code: str = Code.ERROR
    error_class = ErrorClass.PERMANENT

    def __init__(self, message: str = "", *, code: str | None = None, detail: Any = None):
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        if code:
            self.code = str(code)  # a Code member's value, as plain text
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


# --- raised by agents (and the engine on their behalf) ------------------------------------------


class TransientError(SignalboxError):
    """A failure that may succeed if tried again (timeout, rate limit, 5xx)."""

    code: str = Code.TRANSIENT
    error_class = ErrorClass.TRANSIENT


class StepTimeout(TransientError):
    """The step ran past its timeout; the attempt is abandoned and may be retried."""

    code: str = Code.STEP_TIMEOUT


class PermanentError(SignalboxError):
    """A failure that will not go away by retrying."""

    code: str = Code.PERMANENT
    error_class = ErrorClass.PERMANENT


class ContractViolation(SignalboxError):
    """A payload does not satisfy the declared contract."""

    code: str = Code.CONTRACT_VIOLATION
    error_class = ErrorClass.CONTRACT


class StateAccessDenied(ContractViolation):
    """A node read or wrote a run-state key it did not declare."""

    code: str = Code.STATE_ACCESS_DENIED


class PolicyDenied(SignalboxError):
    """The policy in force does not allow this action."""

    code: str = Code.POLICY_DENIED
    error_class = ErrorClass.POLICY


class LimitExceeded(SignalboxError):
    """A declared bound (steps, loop iterations, fan-out, duration, attempts) was hit."""

    code: str = Code.LIMIT_EXCEEDED
    error_class = ErrorClass.LIMIT


# --- raised by services to API clients -----------------------------------------------------------


class NotFound(SignalboxError):
    """No such object, or you may not see it."""

    code: str = Code.NOT_FOUND


class PermissionDenied(SignalboxError):
    """You are not allowed to do this."""

    code: str = Code.PERMISSION_DENIED


class Conflict(SignalboxError):
    """The object changed state before your request could apply."""

    code: str = Code.CONFLICT


class InvalidInput(SignalboxError):
    """The request is not valid."""

    code: str = Code.INVALID_INPUT


class PayloadTooLarge(InvalidInput):
    """A payload is larger than the configured limit."""

    code: str = Code.PAYLOAD_TOO_LARGE


class UnknownWorkflow(NotFound):
    """No workflow is registered under that name and version."""

    code: str = Code.UNKNOWN_WORKFLOW


class UnknownAgent(SignalboxError):
    """No agent is registered under that name."""

    code: str = Code.UNKNOWN_AGENT
