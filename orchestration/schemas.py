"""Request and response shapes of the runs, approvals, escalations and workflows API.

Every field is listed explicitly, so a new model column never leaks into the API by accident.
Timestamps render as ISO 8601 in UTC. Every request field that is stored or compared with a
stored value is one of the ``Stored*`` types below: what the database cannot hold is refused
here, with the field named, rather than by the database with a server error.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from ninja import Field, Schema
from ninja.schema import DjangoGetter
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestration.errors import Code
from orchestration.models import (
    ESCALATION_ACTIONS,
    Decision,
    Run,
    RunEvent,
    RunStatus,
    StateVersion,
    Step,
    Wait,
    WaitKind,
    WaitStatus,
)
from orchestration.payloads import (
    MAX_JSON_DEPTH,
    datetime_refusal,
    payload_refusal,
    text_refusal,
)
from policies.tenants import tenant_by_id

RunStatusName = Literal[
    "queued", "running", "waiting", "compensating", "succeeded", "failed", "cancelled"
]
assert set(RunStatusName.__args__) == set(RunStatus.values)  # type: ignore[attr-defined]  # a Literal alias has __args__ at run time, not in its type
WaitKindName = Literal["approval", "event", "escalation"]
assert set(WaitKindName.__args__) == set(WaitKind.values)  # type: ignore[attr-defined]  # as above

# --- errors -------------------------------------------------------------------------------------


class ErrorBody(Schema):
    code: str = Field(description="Stable machine-readable code, e.g. run_not_found.")
    message: str = Field(description="Human-readable explanation.")
    detail: Any = Field(None, description="Structured detail (field errors, current status).")


class ErrorOut(Schema):
    """Every 4xx/5xx response of the API has this shape."""

    error: ErrorBody


# --- stored values ------------------------------------------------------------------------------


def refusal(code: str, message: str) -> PydanticCustomError:
    """A validation error whose ``type`` is a stable code (the message is used as written)."""
    return PydanticCustomError(str(code), "{message}", {"message": message})


def _storable_text(value: Any) -> Any:
    # Before pydantic's own str check, which refuses a lone surrogate in its own words.
    if isinstance(value, str) and (reason := text_refusal(value)) is not None:
        raise refusal(Code.UNSTORABLE_VALUE, f"the text {reason}")
    return value


def _storable_json(value: Any) -> Any:
    if (reason := payload_refusal(value)) is not None:
        raise refusal(Code.UNSTORABLE_VALUE, f"the value cannot be stored: {reason}")
    return value


#: RFC 3339's date-time, as ``format: date-time`` documents it (pydantic alone would also take
#: numbers as Unix times and several other shapes the document does not promise).
RFC_3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc_3339(value: Any) -> Any:
    if not (isinstance(value, str) and RFC_3339.fullmatch(value)):
        raise PydanticCustomError(
            "datetime_format",
            "Input should be an RFC 3339 date and time with a zone, e.g. 2025-01-31T09:00:00Z",
        )
    return value


def _storable_datetime(value: datetime) -> datetime:
    if (reason := datetime_refusal(value)) is not None:
        raise refusal(Code.UNSTORABLE_VALUE, f"the time {reason}")
    return value


#: In the OpenAPI document only (the validator above gives the clearer message): JSON Schema
#: can say "no NUL" of a string, not of every string in a tree, so objects say it in words.
NO_NUL = "^[^\\u0000]*$"
JSON_RULES = (
    "Its strings (keys too) may not contain NUL (\\u0000) or lone surrogates, its numbers "
    f"must be finite (no NaN or Infinity), and it may nest at most {MAX_JSON_DEPTH} levels."
)

#: Text the database can store: no NUL character, no lone surrogate.
StoredText = Annotated[
    str, BeforeValidator(_storable_text), Field(json_schema_extra={"pattern": NO_NUL})
]
#: A JSON object the database can store as ``jsonb`` (say JSON_RULES in its description).
StoredJson = Annotated[dict[str, Any], AfterValidator(_storable_json)]
#: An aware time PostgreSQL accepts: offset within ±15:59, in range once converted to UTC.
StoredDatetime = Annotated[
    AwareDatetime, BeforeValidator(_rfc_3339), AfterValidator(_storable_datetime)
]


# --- runs ---------------------------------------------------------------------------------------


class BodyIn(Schema):
    """A request body: a JSON object. ninja's Schema would otherwise read fields as attributes
    of any value, so ``42`` or ``[]`` would pass as a body whose fields all have defaults."""

    @model_validator(mode="before")
    @classmethod
    def _must_be_an_object(cls, data: Any) -> Any:
        # ninja's own root validator has already wrapped the value for attribute access.
        raw = data._obj if isinstance(data, DjangoGetter) else data
        if not isinstance(raw, dict | BodyIn):
            raise ValueError("the request body must be a JSON object")
        return data


class RunSubmitIn(BodyIn):
    workflow: StoredText = Field(min_length=1, max_length=100)
    # Strict: JSON's true is not the number 1 (the schema says integer, and so does this).
    version: StrictInt | None = Field(None, ge=1, le=2**31 - 1)
    input: StoredJson = Field(
        default_factory=dict,
        description=f"Checked against the workflow's input contract (`input_schema`). {JSON_RULES}",
    )
    idempotency_key: StoredText | None = Field(None, min_length=1, max_length=200)
    priority: StrictInt = Field(0, ge=-32768, le=32767)
    tenant: StoredText = Field("", max_length=100)


class ErrorSummary(Schema):
    code: str
    message: str


class RunOut(Schema):
    """A run without its steps: what lists and writes return."""

    id: int
    workflow: str
    workflow_version: int
    status: str
    priority: int
    tenant: str
    idempotency_key: str | None
    trace_id: str
    step_count: int
    error: ErrorSummary | None
    degraded: list[dict[str, Any]] = Field(
        description="Steps whose result is partial or was supplied by an operator: step and reason."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    deadline_at: datetime


class RunSubmitOut(RunOut):
    created: bool = Field(description="False when the idempotency key was seen before.")


class RunListQuery(Schema):
    status: list[RunStatusName] | None = Field(None, description="Repeat to match any of several.")
    waiting_for: WaitKindName | None = Field(
        None,
        description="Only runs with an open wait of this kind: a decision (approval), an outside"
        " event, or an operator (escalation).",
    )
    workflow: StoredText | None = Field(None, max_length=100)
    created_after: StoredDatetime | None = Field(
        None, description="ISO 8601 with a zone (offset within ±15:59); inclusive."
    )
    created_before: StoredDatetime | None = Field(
        None, description="ISO 8601 with a zone (offset within ±15:59); exclusive."
    )
    cursor: str | None = Field(
        None, max_length=100, description="next_cursor of the previous page."
    )
    limit: int = Field(50, ge=1, le=200)


class RunPageOut(Schema):
    items: list[RunOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class StepError(Schema):
    error_class: str = Field(alias="class")
    code: str
    message: str
    detail: Any = None


class StepOut(Schema):
    id: int
    key: str
    node: str
    kind: str
    agent: str
    status: str
    attempt: int
    failures: int
    parent_id: int | None = Field(
        description="A map item's map step; a compensation's undone step."
    )
    input: Any
    output: Any
    degraded: str = Field(
        description="Why the output is partial or operator-supplied; empty if it is not."
    )
    error: StepError | None
    attempts: list[dict[str, Any]] = Field(
        description="Every failed attempt: agent, class, code, message, time."
    )
    usage: dict[str, Any]
    created_at: datetime
    available_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class StateVersionOut(Schema):
    key: str
    version: int
    value: Any
    writer: str
    step_id: int | None
    created_at: datetime


class WaitOut(Schema):
    id: int
    step_id: int
    kind: str = Field(description="approval, event or escalation (see /escalations).")
    name: str
    status: str
    tier: int
    reason: str
    action: Any = Field(
        description="An approval's proposed action; an escalation's full context; null for events."
    )
    deadline_at: datetime
    on_timeout: str
    decision: str
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str
    edited_input: Any
    payload: Any
    created_at: datetime


class RunEventOut(Schema):
    id: int
    name: str
    event_id: str
    payload: Any
    wait_id: int | None
    received_at: datetime
    applied_at: datetime | None


class RunDetailOut(RunOut):
    submitted_by: str | None
    input: Any
    output: Any
    state: dict[str, Any] = Field(description="Current value of every state key.")
    state_versions: list[StateVersionOut] = Field(
        description="Every write of every state key, oldest first."
    )
    notes: list[Any]
    steps: list[StepOut]
    waits: list[WaitOut]
    events: list[RunEventOut]


class RunCancelIn(BodyIn):
    reason: StoredText = Field("", max_length=2000)


class RunEventIn(BodyIn):
    name: StoredText = Field(min_length=1, max_length=100)
    event_id: StoredText = Field(min_length=1, max_length=200)
    payload: StoredJson = Field(default_factory=dict, description=JSON_RULES)


class RunEventAcceptedOut(Schema):
    applied: bool = Field(description="The event completed a waiting step now.")
    duplicate: bool = Field(description="This event_id was already delivered to the run.")
    event_id: str


# --- approvals ----------------------------------------------------------------------------------


class ApprovalOut(Schema):
    id: int
    run_id: int
    workflow: str
    node: str
    agent: str
    status: str
    tier: int
    reason: str
    action: Any = Field(
        description="The proposed action: agent, node, input and the state versions it read."
    )
    deadline_at: datetime
    created_at: datetime
    decision: str
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str
    edited_input: Any


def when(
    field: str, values: tuple[str, ...], then: dict[str, Any], otherwise: Any = None
) -> dict[str, Any]:
    """A JSON Schema rule "if ``field`` is one of ``values`` then ``then`` (else ``otherwise``)",
    so the OpenAPI document states a cross-field rule as well as the description does."""
    rule: dict[str, Any] = {
        "if": {"properties": {field: {"enum": list(values)}}, "required": [field]},
        "then": then,
    }
    if otherwise is not None:
        rule["else"] = otherwise
    return rule


def a_reason_is_required(to: tuple[str, ...], reason: str, chosen: Any) -> str:
    """The cross-field rule: ``reason`` must say something when the choice is one of ``to``."""
    if chosen in to and not reason.strip():
        raise refusal(Code.REASON_REQUIRED, f"a reason is required to {chosen}")
    return reason


#: ``reason`` present and not blank (in the document; the validators say it to clients).
REASON_GIVEN = {"required": ["reason"], "properties": {"reason": {"pattern": "\\S"}}}


class ApprovalDecideIn(BodyIn):
    """Approve, reject, or edit-then-approve. Beyond each field's type: a `reason` (not blank)
    is required to reject or edit (422 `reason_required`); `edited_input` is required with
    `edit` (422 `edited_input_missing`) and refused with any other decision (422
    `edited_input_unexpected`)."""

    model_config = {
        "json_schema_extra": {
            "allOf": [
                when("decision", (Decision.REJECT, Decision.EDIT), REASON_GIVEN),
                when(
                    "decision",
                    (Decision.EDIT,),
                    {
                        "required": ["edited_input"],
                        "properties": {"edited_input": {"type": "object"}},
                    },
                    {"properties": {"edited_input": {"type": "null"}}},
                ),
            ]
        }
    }

    decision: Literal["approve", "reject", "edit"]
    reason: StoredText = Field(
        "",
        max_length=2000,
        validate_default=True,
        description="Why; required (not blank) to reject or edit.",
    )
    edited_input: StoredJson | None = Field(
        None,
        validate_default=True,
        description=(
            "With `edit` only, and required with it: the agent's input as corrected, checked "
            f"against the agent's input contract. {JSON_RULES}"
        ),
    )

    @field_validator("reason")
    @classmethod
    def _reason_required(cls, reason: str, info: ValidationInfo) -> str:
        return a_reason_is_required(
            (Decision.REJECT, Decision.EDIT), reason, info.data.get("decision")
        )

    @field_validator("edited_input")
    @classmethod
    def _edited_input_with_edit_only(cls, value: Any, info: ValidationInfo) -> Any:
        decision = info.data.get("decision")
        if decision == Decision.EDIT and value is None:
            raise refusal(
                Code.EDITED_INPUT_MISSING, "edited_input is required with decision 'edit'"
            )
        if decision not in (None, Decision.EDIT) and value is not None:
            raise refusal(
                Code.EDITED_INPUT_UNEXPECTED, "edited_input is only accepted with decision 'edit'"
            )
        return value


class ApprovalBulkDecideIn(BodyIn):
    """Approve (or reject) several approvals of one tier with one reason. Each is decided on its
    own, so one refusal does not undo the others; the answer says what happened to each."""

    model_config = {
        "json_schema_extra": {"allOf": [when("decision", (Decision.REJECT,), REASON_GIVEN)]}
    }

    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(
        min_length=1,
        max_length=100,
        description="The approvals, at most 100, each once, all of one tier.",
        json_schema_extra={"uniqueItems": True},
    )
    decision: Literal["approve", "reject"]
    reason: StoredText = Field(
        "",
        max_length=2000,
        validate_default=True,
        description="Why; required (not blank) to reject.",
    )

    @field_validator("ids")
    @classmethod
    def _each_once(cls, ids: list[int]) -> list[int]:
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            listed = ", ".join(str(i) for i in repeated)
            raise ValueError(f"each approval once: {listed} listed more than once")
        return ids

    @field_validator("reason")
    @classmethod
    def _reason_required(cls, reason: str, info: ValidationInfo) -> str:
        return a_reason_is_required((Decision.REJECT,), reason, info.data.get("decision"))


class ApprovalBulkOutcomeOut(Schema):
    id: int
    ok: bool = Field(description="Decided as asked.")
    code: str = Field(description="Why not, as a stable error code (empty when ok).")
    message: str


# --- escalations --------------------------------------------------------------------------------

EscalationAction = Literal["retry", "skip", "abort"]
EscalationStatusFilter = Literal["open", "resolved", "expired", "cancelled", "all"]


class EscalationOut(Schema):
    """An escalated step: it exhausted its retries, fallback and degraded result and waits for
    an operator to retry it, skip it with a value, or abort the run."""

    id: int
    run_id: int
    workflow: str
    step_id: int
    step: str = Field(description="The step's key in its run: `act`, `answer[2]`, `undo:reserve`.")
    node: str
    agent: str = Field(description="The agent whose attempt escalated (a fallback's, if it ran).")
    status: str = Field(description="open, resolved, expired (unanswered in time) or cancelled.")
    reason: str
    why: str = Field(description="e.g. retries exhausted, contract violation, permanent error.")
    context: dict[str, Any] = Field(
        description=(
            "Everything frozen at escalation time: why, step, node, kind, compensation, agent, "
            "agents_tried, fallback, error {class, code, message, detail}, attempts, tool_calls, "
            "input, payload, actions, skip_contract and skip_schema (what `output` must satisfy)."
        )
    )
    created_at: datetime
    deadline_at: datetime = Field(description="Unanswered by then, the step fails (and the run).")
    decision: str = Field(description="retry, skip or abort once resolved; empty while open.")
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str
    output: Any = Field(None, description="The value supplied with `skip`.")
    actions: list[str] = Field(description="What POST .../resolve accepts now; empty once closed.")


class EscalationPageOut(Schema):
    items: list[EscalationOut]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class EscalationListQuery(Schema):
    status: EscalationStatusFilter = Field("open", description="`all` for every status.")
    workflow: StoredText | None = Field(None, max_length=100)
    cursor: str | None = Field(
        None, max_length=100, description="next_cursor of the previous page."
    )
    limit: int = Field(50, ge=1, le=200)


class EscalationResolveIn(BodyIn):
    """Retry, skip with a value, or abort. Beyond each field's type: a `reason` (not blank) is
    required to skip or abort (422 `reason_required`); `output` is required with `skip` (422
    `output_missing`) and refused with any other action (422 `output_unexpected`)."""

    model_config = {
        "json_schema_extra": {
            "allOf": [
                when("action", (Decision.SKIP, Decision.ABORT), REASON_GIVEN),
                when(
                    "action",
                    (Decision.SKIP,),
                    {"required": ["output"], "properties": {"output": {"type": "object"}}},
                    {"properties": {"output": {"type": "null"}}},
                ),
            ]
        }
    }

    action: EscalationAction
    reason: StoredText = Field(
        "",
        max_length=2000,
        validate_default=True,
        description="Why; required (not blank) to skip or abort.",
    )
    output: StoredJson | None = Field(
        None,
        validate_default=True,
        description=(
            "With `skip` only, and required with it: the step's output, checked against its "
            f"output contract (the escalation's `context.skip_schema`). {JSON_RULES}"
        ),
    )

    @field_validator("reason")
    @classmethod
    def _reason_required(cls, reason: str, info: ValidationInfo) -> str:
        return a_reason_is_required(
            (Decision.SKIP, Decision.ABORT), reason, info.data.get("action")
        )

    @field_validator("output")
    @classmethod
    def _output_with_skip_only(cls, value: Any, info: ValidationInfo) -> Any:
        action = info.data.get("action")
        if action == Decision.SKIP and value is None:
            raise refusal(
                Code.OUTPUT_MISSING,
                "output is required with action 'skip': what the step should produce",
            )
        if action not in (None, Decision.SKIP) and value is not None:
            raise refusal(Code.OUTPUT_UNEXPECTED, "output is only accepted with action 'skip'")
        return value


# --- workflows ----------------------------------------------------------------------------------


class WorkflowOut(Schema):
    name: str
    version: int
    versions: list[int] = Field(description="Every registered version of this workflow.")
    description: str
    input_schema: dict[str, Any]
    max_steps: int
    max_duration_seconds: int
    start: list[str]
    nodes: list[dict[str, Any]]


class CapabilityOut(Schema):
    name: str
    description: str
    side_effects: bool = Field(
        description="Calls carry an idempotency key derived from (run, step, call index)."
    )
    params_schema: dict[str, Any]
    result_schema: dict[str, Any]
    providers: list[dict[str, Any]] = Field(
        description="In priority order, each with its recent health, rate-limit headroom and circuit state."
    )


# --- rendering ----------------------------------------------------------------------------------
# Model rows -> the dicts the Out schemas above validate; the one place a column becomes a field.


def run_out(run: Run) -> dict[str, Any]:
    return {
        "id": run.pk,
        "workflow": run.workflow_name,
        "workflow_version": run.workflow_version,
        "status": run.status,
        "priority": run.priority,
        "tenant": tenant_by_id(run.tenant_id).slug,
        "idempotency_key": run.idempotency_key,
        "trace_id": run.trace_id,
        "step_count": run.step_count,
        "error": {"code": run.error_code, "message": run.error_message} if run.error_code else None,
        "degraded": run.degraded,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "updated_at": run.updated_at,
        "deadline_at": run.deadline_at,
    }


def step_out(step: Step) -> dict[str, Any]:
    failed = bool(step.error_code or step.error_class)
    return {
        "id": step.pk,
        "key": step.key,
        "node": step.node,
        "kind": step.kind,
        "agent": step.agent,
        "status": step.status,
        "attempt": step.attempt,
        "failures": step.failures,
        "parent_id": step.parent_id,
        "input": step.input_override if step.input_override is not None else step.input,
        "output": step.output,
        "degraded": step.degraded,
        "attempts": step.attempts_log,
        "error": {
            "class": step.error_class,
            "code": step.error_code,
            "message": step.error_message,
            "detail": step.error_detail,
        }
        if failed
        else None,
        "usage": step.usage,
        "created_at": step.created_at,
        "available_at": step.available_at,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
    }


def _decided_by(wait: Wait) -> str | None:
    return wait.decided_by.get_username() if wait.decided_by is not None else None


def wait_out(wait: Wait) -> dict[str, Any]:
    return {
        "id": wait.pk,
        "step_id": wait.step_id,
        "kind": wait.kind,
        "name": wait.name,
        "status": wait.status,
        "tier": wait.tier,
        "reason": wait.reason,
        "action": wait.action,
        "deadline_at": wait.deadline_at,
        "on_timeout": wait.on_timeout,
        "decision": wait.decision,
        "decided_by": _decided_by(wait),
        "decided_at": wait.decided_at,
        "decision_reason": wait.decision_reason,
        "edited_input": wait.edited_input,
        "payload": wait.payload,
        "created_at": wait.created_at,
    }


def run_detail_out(
    run: Run,
    *,
    steps: list[Step],
    state_versions: list[StateVersion],
    waits: list[Wait],
    events: list[RunEvent],
) -> dict[str, Any]:
    return {
        **run_out(run),
        "submitted_by": run.submitted_by.get_username() if run.submitted_by is not None else None,
        "input": run.input,
        "output": run.output,
        "state": run.state,
        "state_versions": state_versions,
        "notes": run.notes,
        "steps": [step_out(step) for step in steps],
        "waits": [wait_out(wait) for wait in waits],
        "events": events,
    }


def approval_out(wait: Wait) -> dict[str, Any]:
    return {
        "id": wait.pk,
        "run_id": wait.run_id,
        "workflow": wait.run.workflow_name,
        "node": wait.step.node,
        "agent": wait.step.agent,
        "status": wait.status,
        "tier": wait.tier,
        "reason": wait.reason,
        "action": wait.action,
        "deadline_at": wait.deadline_at,
        "created_at": wait.created_at,
        "decision": wait.decision,
        "decided_by": _decided_by(wait),
        "decided_at": wait.decided_at,
        "decision_reason": wait.decision_reason,
        "edited_input": wait.edited_input,
    }


def escalation_out(wait: Wait) -> dict[str, Any]:
    context = wait.action if isinstance(wait.action, dict) else {}
    is_open = wait.status == WaitStatus.OPEN
    return {
        "id": wait.pk,
        "run_id": wait.run_id,
        "workflow": wait.run.workflow_name,
        "step_id": wait.step_id,
        "step": wait.step.key,
        "node": wait.step.node,
        "agent": context.get("agent") or wait.step.agent,
        "status": wait.status,
        "reason": wait.reason,
        "why": context.get("why", ""),
        "context": context,
        "created_at": wait.created_at,
        "deadline_at": wait.deadline_at,
        "decision": wait.decision,
        "decided_by": _decided_by(wait),
        "decided_at": wait.decided_at,
        "decision_reason": wait.decision_reason,
        "output": wait.payload,
        "actions": [str(a) for a in context.get("actions", ESCALATION_ACTIONS)] if is_open else [],
    }


class RunRetryIn(BodyIn):
    reason: StoredText = Field(min_length=1, max_length=2000)


class EscalationRaiseCeilingIn(BodyIn):
    new_limit: Decimal = Field(
        gt=0,
        max_digits=14,
        decimal_places=6,
        description="The run's new cost ceiling, above the one it stopped at (409 `ceiling_not_raised` otherwise).",
    )
    reason: StoredText = Field(min_length=1, max_length=500, description="Why (not blank).")


class RunSkipIn(BodyIn):
    """Skip a failed run's failed step with the value it should have produced."""

    reason: StoredText = Field(min_length=1, max_length=2000, description="Why (not blank).")
    output: StoredJson = Field(
        description=(
            "The step's output, checked against its output contract (422 `output_contract`). "
            f"{JSON_RULES}"
        ),
    )
