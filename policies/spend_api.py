"""The spend API: ceilings and spend per scope (with percentages), a run's reservations, and
raising a run's ceiling (tier 2 or higher). Mounted by the console under ``/v1/spend``
(``spend_router(ErrorOut, run_get_for_decision)``).
Handlers stay thin: authorize and read through ``policies.spend_selectors``, write through
``policies.ledger``."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any, Literal

from django.contrib.auth.models import User
from django.http import HttpRequest
from ninja import Router, Schema
from ninja.params import functions as param_functions
from pydantic import Field

from policies.calls import recorded_for_run
from policies.ledger import ceiling_raise
from policies.models import ReservationKind, ReservationStatus
from policies.spend_selectors import ScopeUse, reservations_for_run_for_user, spend_scopes_for_user

ScopeKindName = Literal["run", "workflow_day", "agent_day", "tenant_month", "global_day"]
RUN_ID: Any = param_functions.Path(..., ge=1, le=2**63 - 1)


class ScopeOut(Schema):
    id: int
    kind: str
    key: str
    period_start: str | None
    limit: str
    spent: str
    reserved: str
    spent_percent: float
    committed_percent: float
    soft_percent: float


class ReservationOut(Schema):
    #: None for a call recorded on its step's row (``recorded_on`` = ``step``).
    id: int | None
    run_id: int | None
    step_id: int | None
    action: str
    amount: str
    actual: str | None
    status: str
    scope_ids: list[int]
    owner: str
    #: None for a call recorded on its step (it held nothing of its own).
    expires_at: str | None
    created_at: str
    #: ``call``, or ``block``: several calls' worth at once, each of its calls listed too.
    kind: str
    #: For a call made from a block: that block (the block's settlement charges it).
    block_id: int | None
    #: ``ledger``: a row of the ledger's own; ``step``: a call made from a block by an attempt
    #: that succeeded, recorded on its step's row (``policies.calls``).
    recorded_on: str = "ledger"


class RaiseIn(Schema):
    new_limit: Decimal = Field(gt=0, max_digits=14, decimal_places=6)
    reason: str = Field(min_length=1, max_length=500)


def _user(request: HttpRequest) -> User:
    user: User = request.auth  # type: ignore[attr-defined]  # set by ninja
    return user


#: Refuses (raises) unless the user may decide for the run: its tenant, its workflow. The
#: engine's selector, handed in by the console (this app sits below the engine).
RunDecideCheck = Callable[[User, int], object]


def spend_router(error_out: type[Schema], run_decide_check: RunDecideCheck) -> Router:
    """The router, its errors documented with the console's error shape ``error_out``; raising
    a run's ceiling asks ``run_decide_check`` first, as any other answer to its escalation."""
    router = Router(tags=["spend"])
    errors: dict[int, type[Schema]] = {code: error_out for code in (401, 403, 404, 409, 422)}

    @router.get(
        "/ceilings",
        response={200: list[ScopeOut], **errors},
        summary="Cost ceilings and spend per scope",
    )
    def spend_scopes(
        request: HttpRequest, kind: ScopeKindName | None = None
    ) -> list[dict[str, Any]]:
        scopes = spend_scopes_for_user(_user(request))
        if kind:
            scopes = scopes.filter(kind=kind)
        return [ScopeUse(scope).as_dict() for scope in scopes[:500]]

    @router.get(
        "/runs/{run_id}/reservations",
        response={200: list[ReservationOut], **errors},
        summary="A run's cost reservations",
    )
    def run_reservations(request: HttpRequest, run_id: int = RUN_ID) -> list[dict[str, Any]]:
        reservations = reservations_for_run_for_user(_user(request), run_id)[:1000]
        rows = [
            {
                "id": r.pk,
                "run_id": r.run_id,
                "step_id": r.step_id,
                "action": r.action,
                "amount": str(r.amount),
                "actual": None if r.actual is None else str(r.actual),
                "status": r.status,
                "scope_ids": r.scope_ids,
                "owner": r.owner,
                "expires_at": r.expires_at.isoformat(),
                "created_at": r.created_at.isoformat(),
                "kind": r.kind,
                "block_id": r.block_id,
                "recorded_on": "ledger",
                "_at": r.created_at,
            }
            for r in reservations
        ]
        rows += [
            {
                "id": None,
                "run_id": call.run_id,
                "step_id": call.step_id,
                "action": call.action,
                "amount": str(call.worst),
                "actual": None if call.actual is None else str(call.actual),
                "status": ReservationStatus.SETTLED.value,
                "scope_ids": [],
                "owner": "",
                "expires_at": None,
                "created_at": call.at.isoformat(),
                "kind": ReservationKind.CALL.value,
                "block_id": call.block_id,
                "recorded_on": "step",
                "_at": call.at,
            }
            for call in recorded_for_run(run_id)[:1000]
        ]
        rows.sort(key=lambda row: row["_at"])
        return [{k: v for k, v in row.items() if k != "_at"} for row in rows[:1000]]

    @router.post(
        "/runs/{run_id}/ceiling",
        response={200: ScopeOut, **errors},
        summary="Raise a run's cost ceiling (tier 2+)",
    )
    def run_ceiling_raise(
        request: HttpRequest, body: RaiseIn, run_id: int = RUN_ID
    ) -> dict[str, Any]:
        user = _user(request)
        run_decide_check(user, run_id)
        scope = ceiling_raise(
            run_id=run_id, new_limit=body.new_limit, user=user, reason=body.reason
        )
        return ScopeUse(scope).as_dict()

    return router
