"""REST endpoints for runs, approvals, escalations and workflows (mounted at ``/api/v1/``).

Handlers stay thin: parse (schemas), authorize (selectors), call one service, render. Errors are
raised as ``SignalboxError`` and turned into JSON, with their HTTP status, in ``console.api``.
"""

from __future__ import annotations

from typing import Annotated, Any

from django.contrib.auth.models import User
from django.http import HttpRequest
from ninja import Header, Query, Router, Status
from ninja.params import functions as param_functions

from orchestration import selectors, services
from orchestration.errors import Code, InvalidInput
from orchestration.registry import workflow_get, workflow_list
from orchestration.schemas import (
    ApprovalBulkDecideIn,
    ApprovalBulkOutcomeOut,
    ApprovalDecideIn,
    ApprovalOut,
    CapabilityOut,
    ErrorOut,
    EscalationListQuery,
    EscalationOut,
    EscalationPageOut,
    EscalationRaiseCeilingIn,
    EscalationResolveIn,
    RunCancelIn,
    RunDetailOut,
    RunEventAcceptedOut,
    RunEventIn,
    RunListQuery,
    RunOut,
    RunPageOut,
    RunRetryIn,
    RunSkipIn,
    RunSubmitIn,
    RunSubmitOut,
    StoredText,
    WorkflowOut,
    approval_out,
    escalation_out,
    run_detail_out,
    run_out,
)

router = Router(tags=["orchestration"])

# Database ids are bigints; anything larger cannot name a row.
MAX_ID = 2**63 - 1


def id_in_path() -> Any:
    """A database id as a path parameter: a positive bigint."""
    return param_functions.Path(..., ge=1, le=MAX_ID)


def version_in_query() -> Any:
    """An optional workflow version in the query string."""
    return param_functions.Query(None, ge=1, le=2**31 - 1)


def authenticated(request: HttpRequest) -> User:
    """The user ninja's authentication set on the request (every route here requires one)."""
    user: User = request.auth  # type: ignore[attr-defined]  # set by ninja; Django's HttpRequest type lacks it
    return user


def errors(*codes: int) -> dict[int, type[ErrorOut]]:
    """Document error responses (raised as exceptions, rendered by the API's handlers). Every
    operation with a body can also answer 400 ``malformed_json``: ``console.api`` adds it."""
    return dict.fromkeys(codes, ErrorOut)


# --- runs ---------------------------------------------------------------------------------------


@router.post(
    "/runs",
    response={200: RunSubmitOut, 201: RunSubmitOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Submit a run",
    description=(
        "Starts a run of `workflow` (latest version unless `version` is given). With an "
        "idempotency key (body or `Idempotency-Key` header) a repeated submit returns the first "
        "run with 200 and `created: false` instead of starting another."
    ),
)
def run_submit(
    request: HttpRequest,
    payload: RunSubmitIn,
    idempotency_key: Annotated[
        StoredText | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> Status[dict[str, Any]]:
    user = authenticated(request)
    selectors.submit_check(user)
    key = payload.idempotency_key
    if idempotency_key and key and idempotency_key != key:
        raise InvalidInput(
            "the Idempotency-Key header and the body's idempotency_key differ",
            code=Code.IDEMPOTENCY_KEY_MISMATCH,
        )
    submitted = services.run_submit(
        workflow=payload.workflow,
        version=payload.version,
        input=payload.input,
        submitted_by=user,
        idempotency_key=key or idempotency_key,
        priority=payload.priority,
        tenant=payload.tenant,
    )
    body = {**run_out(submitted.run), "created": submitted.created}
    return Status(201 if submitted.created else 200, body)


@router.get("/runs", response={200: RunPageOut, **errors(401, 422)}, summary="List runs")
def run_list(request: HttpRequest, filters: Query[RunListQuery]) -> dict[str, Any]:
    page = selectors.run_list_for_user(
        authenticated(request),
        status=list(filters.status) if filters.status else None,
        waiting_for=filters.waiting_for,
        workflow=filters.workflow,
        created_after=filters.created_after,
        created_before=filters.created_before,
        cursor=filters.cursor,
        limit=filters.limit,
    )
    return {"items": [run_out(run) for run in page.items], "next_cursor": page.next_cursor}


@router.get(
    "/runs/{run_id}",
    response={200: RunDetailOut, **errors(401, 404, 422)},
    by_alias=True,
    summary="A run with its steps, state history, waits and events",
)
def run_detail(request: HttpRequest, run_id: int = id_in_path()) -> dict[str, Any]:
    run = selectors.run_get_for_user(authenticated(request), run_id)
    return run_detail_out(
        run,
        steps=selectors.run_steps(run),
        state_versions=selectors.run_state_history(run),
        waits=selectors.run_waits(run),
        events=selectors.run_events(run),
    )


@router.post(
    "/runs/{run_id}/cancel",
    response={200: RunOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Cancel a run that has not ended",
)
def run_cancel(
    request: HttpRequest,
    run_id: int = id_in_path(),
    payload: RunCancelIn | None = None,
) -> Any:
    user = authenticated(request)
    run = selectors.run_get_for_decision(user, run_id)
    cancelled = services.run_cancel(
        run_id=run.pk, user=user, reason=payload.reason if payload else ""
    )
    return run_out(cancelled)


@router.post(
    "/runs/{run_id}/events",
    response={202: RunEventAcceptedOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Deliver a named outside event to a run",
    description="Sending the same `event_id` again is a no-op answered with `duplicate: true`.",
)
def run_event_send(
    request: HttpRequest, payload: RunEventIn, run_id: int = id_in_path()
) -> Status[dict[str, Any]]:
    user = authenticated(request)
    run = selectors.run_get_for_decision(user, run_id)
    delivery = services.run_send_event(
        run_id=run.pk,
        name=payload.name,
        event_id=payload.event_id,
        payload=payload.payload,
        user=user,
    )
    return Status(
        202,
        {
            "applied": delivery.applied,
            "duplicate": delivery.duplicate,
            "event_id": delivery.event.event_id,
        },
    )


# --- approvals ----------------------------------------------------------------------------------


@router.get(
    "/approvals",
    response={200: list[ApprovalOut], **errors(401)},
    summary="Open approvals on runs you can see, oldest deadline first",
)
def approval_list(request: HttpRequest) -> Any:
    pending = selectors.approvals_pending_for_user(authenticated(request))
    return [approval_out(wait) for wait in pending]


@router.post(
    "/approvals/{approval_id}/decide",
    response={200: ApprovalOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Approve, reject, or edit-then-approve a pending action",
    description=(
        "A `reason` (not blank) is required to reject or edit (422 `reason_required`); "
        "`edited_input` (the agent's input, checked against its contract) is required with "
        "`edit` (422 `edited_input_missing`) and refused otherwise (422 "
        "`edited_input_unexpected`). A second decision gets 409 `already_decided`."
    ),
)
def approval_decide(
    request: HttpRequest, payload: ApprovalDecideIn, approval_id: int = id_in_path()
) -> Any:
    user = authenticated(request)
    wait = selectors.approval_get_for_decision(user, approval_id)
    decided = services.approval_decide(
        wait_id=wait.pk,
        run_id=wait.run_id,
        user=user,
        decision=payload.decision,
        reason=payload.reason,
        edited_input=payload.edited_input,
        read=wait,
    )
    return approval_out(decided)


@router.post(
    "/approvals/decide",
    response={200: list[ApprovalBulkOutcomeOut], **errors(401, 413, 422)},
    summary="Approve or reject several pending actions of one tier with one reason",
    description=(
        "Each approval is decided on its own (one refusal does not undo the others) and the "
        "answer lists each one's outcome in the order asked: `ok`, or a `code` such as "
        "`approval_not_found`, `already_decided` or `tier_too_low`. Approvals of different tiers "
        "are refused as a whole (422 `invalid_decision`), and so is an approval listed twice "
        "(422 `invalid_request`); a reason (not blank) is required to reject (422 "
        "`reason_required`)."
    ),
)
def approvals_decide_bulk(request: HttpRequest, payload: ApprovalBulkDecideIn) -> Any:
    outcomes = services.approvals_decide_bulk(
        wait_ids=payload.ids,
        user=authenticated(request),
        decision=payload.decision,
        reason=payload.reason,
    )
    return [{"id": o.wait_id, "ok": o.ok, "code": o.code, "message": o.message} for o in outcomes]


# --- escalations (failed steps waiting for an operator) ------------------------------------------


@router.get(
    "/escalations",
    response={200: EscalationPageOut, **errors(401, 422)},
    summary="Escalated steps on runs you can see, newest first (open ones unless ?status=)",
    description=(
        "A step escalates when it has exhausted its retries, fallback agent and degraded "
        "result; it then waits for an operator to retry it, skip it with a value, or abort "
        "the run. Each item carries the full context (every attempt, error, tool call and "
        "agent tried). Keyset-paginated: pass `next_cursor` as `?cursor=`."
    ),
)
def escalation_list(request: HttpRequest, filters: Query[EscalationListQuery]) -> dict[str, Any]:
    page = selectors.escalations_for_user(
        authenticated(request),
        status=filters.status,
        workflow=filters.workflow,
        cursor=filters.cursor,
        limit=filters.limit,
    )
    return {
        "items": [escalation_out(wait) for wait in page.items],
        "next_cursor": page.next_cursor,
    }


@router.get(
    "/escalations/{escalation_id}",
    response={200: EscalationOut, **errors(401, 404, 422)},
    summary="One escalated step with its full context",
)
def escalation_detail(request: HttpRequest, escalation_id: int = id_in_path()) -> dict[str, Any]:
    user = authenticated(request)
    return escalation_out(selectors.escalation_get_for_user(user, escalation_id))


@router.post(
    "/escalations/{escalation_id}/resolve",
    response={200: EscalationOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Retry an escalated step, skip it with a value, or abort its run",
    description=(
        "`retry` runs the step again with a fresh attempt budget; `skip` completes it with "
        "`output` (checked against the step's output contract, `context.skip_schema`; 422 "
        "`output_contract` otherwise) and marks the run degraded; `abort` fails the run (its "
        "completed side effects are compensated). A `reason` (not blank) is required to skip "
        "or abort (422 `reason_required`); `output` is required with `skip` (422 "
        "`output_missing`) and refused otherwise (422 `output_unexpected`). A second answer "
        "gets 409 `already_decided`."
    ),
)
def escalation_resolve(
    request: HttpRequest,
    payload: EscalationResolveIn,
    escalation_id: int = id_in_path(),
) -> dict[str, Any]:
    user = authenticated(request)
    wait = selectors.escalation_get_for_resolve(user, escalation_id)
    services.escalation_resolve(
        wait_id=wait.pk,
        run_id=wait.run_id,
        user=user,
        action=payload.action,
        reason=payload.reason,
        output=payload.output,
    )
    return escalation_out(selectors.escalation_get_for_user(user, wait.pk))


@router.post(
    "/escalations/{escalation_id}/raise-ceiling",
    response={200: EscalationOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Raise the run's cost ceiling an escalated step stopped at, then retry the step",
    description=(
        "For an escalation whose step stopped at its run's own cost ceiling (`context.error.code` "
        "`ceiling_exceeded`, `detail.kind` `run`): the run's ceiling becomes `new_limit` "
        "(tier 2 or higher, 403 `ceiling_tier_required`; above the ceiling in force, 409 "
        "`ceiling_not_raised`; audited `ceiling.raised`), then the step is retried. Any other "
        "escalation, or one that stopped at a ceiling the run shares, gets 422 "
        "`invalid_action`. A second answer gets 409 `already_decided`."
    ),
)
def escalation_raise_ceiling(
    request: HttpRequest,
    payload: EscalationRaiseCeilingIn,
    escalation_id: int = id_in_path(),
) -> dict[str, Any]:
    user = authenticated(request)
    wait = selectors.escalation_get_for_resolve(user, escalation_id)
    services.escalation_raise_ceiling(
        wait_id=wait.pk,
        run_id=wait.run_id,
        user=user,
        new_limit=payload.new_limit,
        reason=payload.reason,
    )
    return escalation_out(selectors.escalation_get_for_user(user, wait.pk))


# --- workflows ----------------------------------------------------------------------------------


def _workflow_out(name: str, version: int | None = None) -> dict[str, Any]:
    versions = [wf.version for wf in workflow_list() if wf.name == name]
    return {**workflow_get(name, version).describe(), "versions": versions}


@router.get(
    "/workflows", response={200: list[WorkflowOut], **errors(401)}, summary="Registered workflows"
)
def workflow_index(request: HttpRequest) -> list[dict[str, Any]]:
    names = sorted({wf.name for wf in workflow_list()})
    return [_workflow_out(name) for name in names]


@router.get(
    "/workflows/{name}",
    response={200: WorkflowOut, **errors(401, 404, 422)},
    summary="One workflow's graph and input contract (latest version unless ?version=)",
)
def workflow_detail(
    request: HttpRequest, name: str, version: int | None = version_in_query()
) -> dict[str, Any]:
    return _workflow_out(name, version)


# --- tools --------------------------------------------------------------------------------------


@router.get(
    "/capabilities",
    response={200: list[CapabilityOut], **errors(401, 403)},
    summary="Capabilities and their providers: health, rate-limit headroom, circuit state",
)
def capability_index(request: HttpRequest) -> list[dict[str, Any]]:
    return selectors.capability_status_list_for_user(authenticated(request))


# --- retrying a failed run ----------------------------------------------------------------------


@router.post(
    "/runs/{run_id}/retry",
    response={200: RunOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Retry a failed run from its failed step",
    description=(
        "The run runs again from the step that failed, with a fresh attempt budget; a reason is "
        "required. A run that is not failed gets 409 `run_not_failed` (so a second click is "
        "refused), one whose failure cancelled or undid other steps 409 `run_not_retryable`."
    ),
)
def run_retry(request: HttpRequest, payload: RunRetryIn, run_id: int = id_in_path()) -> Any:
    user = authenticated(request)
    run = selectors.run_get_for_decision(user, run_id)
    retried = services.run_retry(run_id=run.pk, user=user, reason=payload.reason)
    return run_out(retried)


@router.post(
    "/runs/{run_id}/skip",
    response={200: RunOut, **errors(401, 403, 404, 409, 413, 422)},
    summary="Skip a failed run's failed step with a value",
    description=(
        "The step that failed succeeds with `output` (checked against its output contract, 422 "
        "`output_contract`), marked degraded, and the run goes on from it; a reason is required. "
        "A run that is not failed gets 409 `run_not_failed` (so a second click is refused), one "
        "whose failure cancelled or undid other steps 409 `run_not_retryable`."
    ),
)
def run_skip(request: HttpRequest, payload: RunSkipIn, run_id: int = id_in_path()) -> Any:
    user = authenticated(request)
    run = selectors.run_get_for_decision(user, run_id)
    if not isinstance(payload.output, dict):
        raise InvalidInput("output must be a JSON object", code=Code.OUTPUT_CONTRACT)
    skipped = services.run_skip_failed_step(
        run_id=run.pk, user=user, reason=payload.reason, output=payload.output
    )
    return run_out(skipped)
