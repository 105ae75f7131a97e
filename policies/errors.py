"""Errors of the policies app, with stable codes and a class.

The same shape as the engine's (``code``, ``error_class``, ``message``, ``detail``,
``as_dict()``), and the class names the same words, so the console maps both to HTTP in one
place; but ``policies`` sits below the engine and cannot import it, hence a hierarchy of its own.
Codes are stable strings that API clients and operators branch on: never rename or reuse one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorClass(StrEnum):
    """What a caller does with the error; the values are the engine's (``orchestration.errors``)."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONTRACT = "contract"
    POLICY = "policy"
    LIMIT = "limit"


class Code(StrEnum):
    """Every error code the policies app raises. Append; never rename or reuse one."""

    POLICY_ERROR = "policy_error"
    # policy versions (policies.services)
    VERSION_NOT_FOUND = "policy_version_not_found"
    NOT_A_DRAFT = "policy_not_a_draft"
    NOT_SUBMITTED = "policy_not_submitted"
    NOT_APPROVED = "policy_not_approved"
    FOUR_EYES = "policy_four_eyes"
    REASON_REQUIRED = "policy_reason_required"
    # the spend ledger (policies.ledger)
    CEILING_EXCEEDED = "ceiling_exceeded"
    COST_UNKNOWN = "cost_unknown"
    UNKNOWN_MODEL = "unknown_model"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_SCOPE = "invalid_scope"
    RESERVATION_NOT_FOUND = "reservation_not_found"
    RESERVATION_SETTLED = "reservation_settled"
    RESERVATION_RELEASED = "reservation_released"
    CEILING_NOT_RAISED = "ceiling_not_raised"
    INVALID_RESERVATION = "invalid_reservation"
    # policy pages and API (policies.selectors, policies.api)
    POLICY_NOT_FOUND = "policy_not_found"
    READ_DENIED = "policy_read_denied"
    EDIT_DENIED = "policy_edit_denied"
    REVIEW_DENIED = "policy_review_denied"
    NOT_RETIRED = "policy_not_retired"
    INVALID_SOURCE = "policy_invalid"
    INVALID_QUERY = "policy_invalid_query"
    CEILING_TIER_REQUIRED = "ceiling_tier_required"
    SPEND_NOT_VISIBLE = "spend_not_visible"


class PolicyError(Exception):
    """Base for every error the policies app raises on purpose."""

    code: str = Code.POLICY_ERROR
    error_class = ErrorClass.PERMANENT

    def __init__(self, message: str = "", *, code: str | None = None, detail: Any = None):
        default = (self.__class__.__doc__ or self.code).strip()
        super().__init__(message or default)
        self.message = message or default
        if code:
            self.code = str(code)
        self.detail = detail

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            out["detail"] = self.detail
        return out


# --- the spend ledger -------------------------------------------------------------------------


class CeilingExceeded(PolicyError):
    """The call would take a scope past its hard cost ceiling; nothing was reserved.

    ``detail`` names the scope (kind, key, period start), its limit, what it has spent and
    reserved, and the amount asked, as strings; ``scope`` is the scope's state as a
    ``policies.ledger.ScopeSpend`` and ``amount`` the amount asked. The engine turns it into an
    escalation: raise the ceiling (``ceiling_raise``) or stop the run."""

    code: str = Code.CEILING_EXCEEDED
    error_class = ErrorClass.POLICY

    def __init__(self, message: str, *, scope: Any, amount: Any, detail: Any = None):
        super().__init__(message, detail=detail)
        self.scope = scope
        self.amount = amount


class CostUnknown(PolicyError):
    """The cost of the call cannot be estimated, so it is not made (fail closed)."""

    code: str = Code.COST_UNKNOWN
    error_class = ErrorClass.POLICY


class UnknownModel(CostUnknown):
    """The model is not in the price table, so its cost cannot be estimated (fail closed)."""

    code: str = Code.UNKNOWN_MODEL


class InvalidAmount(PolicyError):
    """An amount of money, a price or a token count the ledger cannot take (a float, a negative
    number, more than six decimal places of a limit, out of range)."""

    code: str = Code.INVALID_AMOUNT


class InvalidScope(PolicyError):
    """A scope the ledger cannot take (an unknown kind, a period where none belongs, twice)."""

    code: str = Code.INVALID_SCOPE


class InvalidReservation(PolicyError):
    """A reservation the ledger cannot take: a time without a zone, an expiry not after now, an
    action or owner that does not fit its column."""

    code: str = Code.INVALID_RESERVATION


class ReservationNotFound(PolicyError):
    """No such reservation."""

    code: str = Code.RESERVATION_NOT_FOUND


class ReservationSettled(PolicyError):
    """The reservation was already settled, with a different actual cost."""

    code: str = Code.RESERVATION_SETTLED


class ReservationReleased(PolicyError):
    """The reservation was released (by its holder, or by the reaper after it expired): there is
    no money held to settle against."""

    code: str = Code.RESERVATION_RELEASED


class CeilingNotRaised(PolicyError):
    """The new limit is not above the scope's limit in force; a ceiling is only ever raised."""

    code: str = Code.CEILING_NOT_RAISED


class SpendNotVisible(PolicyError):
    """You may not see this spend."""

    code: str = Code.SPEND_NOT_VISIBLE


# --- policy versions ---------------------------------------------------------------------------


class PolicyNotFound(PolicyError):
    """No such policy or version."""

    code: str = Code.VERSION_NOT_FOUND


class PolicyConflict(PolicyError):
    """The version is not in the state this step of its review needs."""

    code: str = Code.NOT_A_DRAFT


class PolicyDenied(PolicyError):
    """You may not do this to this version (four eyes: not to one you wrote)."""

    code: str = Code.FOUR_EYES


class PolicyInvalidQuery(PolicyError):
    """A parameter of a policy read that cannot be used (a day count out of range, two versions
    of different policies compared)."""

    code: str = Code.INVALID_QUERY
