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


class SignalboxError(Exception):
    """Base for every error the engine raises on purpose."""

    code = "error"
    error_class = ErrorClass.PERMANENT
    http_status = 400

    def __init__(self, message: str = "", *, code: str | None = None, detail: Any = None):
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        if code:
            self.code = code
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


# --- raised by agents (and the engine on their behalf) ------------------------------------------


class TransientError(SignalboxError):
    """A failure that may succeed if tried again (timeout, rate limit, 5xx)."""

    code = "transient"
    error_class = ErrorClass.TRANSIENT


class StepTimeout(TransientError):
    """The step ran past its timeout; the attempt is abandoned and may be retried."""

    code = "step_timeout"


class PermanentError(SignalboxError):
    """A failure that will not go away by retrying."""

    code = "permanent"
    error_class = ErrorClass.PERMANENT


class ContractViolation(SignalboxError):
    """A payload does not satisfy the declared contract."""

    code = "contract_violation"
    error_class = ErrorClass.CONTRACT
    http_status = 422


class StateAccessDenied(ContractViolation):
    """A node read or wrote a run-state key it did not declare."""

    code = "state_access_denied"


class LimitExceeded(SignalboxError):
    """A declared bound (steps, loop iterations, fan-out, duration, attempts) was hit."""

    code = "limit_exceeded"
    error_class = ErrorClass.LIMIT
    http_status = 409


# --- raised by services to API clients -----------------------------------------------------------


class NotFound(SignalboxError):
    """No such object, or you may not see it."""

    code = "not_found"
    http_status = 404


class PermissionDenied(SignalboxError):
    """You are not allowed to do this."""

    code = "permission_denied"
    http_status = 403


class Conflict(SignalboxError):
    """The object changed state before your request could apply."""

    code = "conflict"
    http_status = 409


class InvalidInput(SignalboxError):
    """The request is not valid."""

    code = "invalid_input"
    http_status = 422


class PayloadTooLarge(InvalidInput):
    """A payload is larger than the configured limit."""

    code = "payload_too_large"
    http_status = 413


class UnknownWorkflow(NotFound):
    """No workflow is registered under that name and version."""

    code = "unknown_workflow"


class UnknownAgent(SignalboxError):
    """No agent is registered under that name."""

    code = "unknown_agent"
