"""REST endpoints for policies and their versions (mounted at ``/api/v1/policies/``): list,
read, draft, submit, review, activate, roll back, diff and simulate.

Handlers stay thin: parse (the schemas below), authorize (``policies.selectors``), call one
service, render. Errors are raised as ``PolicyError`` (or ``PolicySourceError`` for a document
with problems, each with its field, line and column) and turned into JSON, with their HTTP
status, in ``console.api``. Who may do what: ``policies.selectors``' docstring.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from django.contrib.auth.models import User
from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status
from ninja.errors import AuthenticationError
from ninja.params import functions as param_functions
from pydantic import field_validator

from policies import selectors, services
from policies.models import Policy, PolicyVersion
from policies.simulate import Change, SimulatedAction, Verdict

router = Router(tags=["policies"])

MAX_ID = 2**63 - 1
#: A draft's source, at most (about 2,000 rules). Even written as JSON escapes (6 bytes a
#: character) it stays under the request body limit, so a longer one is a 422 naming the field,
#: not a 413 for the whole body.
MAX_DRAFT_CHARACTERS = 150_000
StatusName = Literal["draft", "submitted", "approved", "active", "retired", "rejected"]


def _id_in_path() -> Any:
    return param_functions.Path(..., ge=1, le=MAX_ID)


def _name_in_path() -> Any:
    return param_functions.Path(..., min_length=1, max_length=100, pattern=r"^[-a-zA-Z0-9_]+$")


def _user(request: HttpRequest) -> User:
    user = getattr(request, "auth", None)
    if not isinstance(user, User):
        raise AuthenticationError()
    return user


def _storable(value: str) -> str:
    # PostgreSQL refuses NUL in text, and lone surrogates cannot be encoded: refuse them here
    # with a clear 422 rather than a database error.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


# --- schemas ----------------------------------------------------------------------------------


# The API's one error shape (``orchestration.schemas.ErrorOut``), declared again here because
# policies sit below the engine and cannot import it; same names and fields, so the OpenAPI
# document has one ErrorOut (a test holds the two equal).
class ErrorBody(Schema):
    code: str = Field(description="Stable machine-readable code, e.g. run_not_found.")
    message: str = Field(description="Human-readable explanation.")
    detail: Any = Field(None, description="Structured detail (field errors, current status).")


class ErrorOut(Schema):
    """Every 4xx/5xx response of the API has this shape."""

    error: ErrorBody


def _errors(*statuses: int) -> dict[int, type[Schema]]:
    return dict.fromkeys(statuses, ErrorOut)


class PolicyOut(Schema):
    name: str
    description: str
    active_version_id: int | None
    active_version: int | None = Field(description="The number of the version in force.")
    version_count: int


class VersionOut(Schema):
    id: int
    policy: str
    number: int
    status: StatusName
    note: str = Field(description="Why this version exists, in its author's words.")
    digest: str
    author: str | None
    created_at: datetime
    submitted_at: datetime | None
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_note: str
    activated_by: str | None
    activated_at: datetime | None


class VersionPageOut(Schema):
    items: list[VersionOut]
    next_before: int | None = Field(description="Pass as `before` for the next (older) page.")


class HistoryOut(Schema):
    verb: str
    actor: str
    at: datetime
    note: str


class RuleOut(Schema):
    id: str
    description: str
    summary: str


class VersionDetailOut(VersionOut):
    source: str
    document: dict[str, Any]
    rules: list[RuleOut]
    history: list[HistoryOut]


class DraftIn(Schema):
    source: str = Field(max_length=MAX_DRAFT_CHARACTERS, description="The document, YAML or JSON.")
    note: str = Field("", max_length=2000, description="Why this version exists.")

    _source = field_validator("source", "note")(_storable)


class ReviewIn(Schema):
    approve: bool
    note: str = Field("", max_length=2000, description="Required when rejecting.")

    _note = field_validator("note")(_storable)


class ActivateIn(Schema):
    note: str = Field("", max_length=2000)

    _note = field_validator("note")(_storable)


class RollbackIn(Schema):
    reason: str = Field(min_length=1, max_length=2000)

    _reason = field_validator("reason")(_storable)


class VersionPageQuery(Schema):
    before: int | None = Field(None, ge=1, le=2**31 - 1)
    limit: int = Field(50, ge=1, le=selectors.VERSION_PAGE_MAX)


class DiffQuery(Schema):
    from_version: int = Field(ge=1, le=MAX_ID, description="The id of the older version.")
    to_version: int = Field(ge=1, le=MAX_ID, description="The id of the newer version.")


class DiffOut(Schema):
    from_version: VersionOut
    to_version: VersionOut
    changes: list[str] = Field(
        description="One line per change, e.g. `rule refund-tier-2: tier 2 -> 3`."
    )
    unified: str = Field(description="A unified diff of the two canonical YAML sources.")


class SimulationQuery(Schema):
    days: int = Field(7, ge=1, le=selectors.SIMULATION_MAX_DAYS)
    examples: int = Field(5, ge=0, le=50, description="Example actions kept per change.")


class ExampleOut(Schema):
    decision_id: int | None
    run_id: int | None
    action: str
    decided_at: datetime
    current: str
    current_rule: str
    draft: str
    draft_rule: str
    reason: str = Field(description="Why the draft decides as it does.")


class ChangeOut(Schema):
    before: str
    after: str
    count: int
    sentence: str
    by_action: dict[str, int]
    by_rule: dict[str, int]
    examples: list[ExampleOut]


class RuleCountOut(Schema):
    rule: str
    current: int
    draft: int


class SimulationOut(Schema):
    version: VersionOut
    baseline_version: int | None = Field(
        description="The active version compared with (none: allow all)."
    )
    days: int
    since: datetime
    total: int
    changed: int
    sentences: list[str]
    current_outcomes: dict[str, int]
    draft_outcomes: dict[str, int]
    rules: list[RuleCountOut]
    changes: list[ChangeOut]
    recorded_differs: int
    skipped: int
    capped: bool


# --- rendering --------------------------------------------------------------------------------


def _name(user: User | None) -> str | None:
    return user.get_username() if user is not None else None


def policy_out(policy: Policy) -> dict[str, Any]:
    active = policy.active_version
    return {
        "name": policy.name,
        "description": policy.description,
        "active_version_id": policy.active_version_id,
        "active_version": active.number if active is not None else None,
        "version_count": getattr(policy, "version_count", 0),
    }


def version_out(version: PolicyVersion) -> dict[str, Any]:
    return {
        "id": version.pk,
        "policy": version.policy.name,
        "number": version.number,
        "status": version.status,
        "note": version.note,
        "digest": version.digest,
        "author": _name(version.author),
        "created_at": version.created_at,
        "submitted_at": version.submitted_at,
        "reviewed_by": _name(version.reviewed_by),
        "reviewed_at": version.reviewed_at,
        "review_note": version.review_note,
        "activated_by": _name(version.activated_by),
        "activated_at": version.activated_at,
    }


def version_detail_out(version: PolicyVersion) -> dict[str, Any]:
    return {
        **version_out(version),
        "source": version.source,
        "document": version.document,
        "rules": [asdict(rule) for rule in selectors.version_rules(version)],
        "history": [asdict(entry) for entry in selectors.policy_version_history(version)],
    }


def example_out(example: SimulatedAction, runs: dict[int, int]) -> dict[str, Any]:
    record = example.record
    return {
        "decision_id": record.id,
        "run_id": runs.get(record.id) if record.id is not None else None,
        "action": example.facts.action,
        "decided_at": record.decided_at,
        "current": str(Verdict.of(example.current)),
        "current_rule": example.current.rule,
        "draft": str(Verdict.of(example.draft)),
        "draft_rule": example.draft.rule,
        "reason": example.draft.reason,
    }


def change_out(change: Change, runs: dict[int, int]) -> dict[str, Any]:
    return {
        "before": str(change.before),
        "after": str(change.after),
        "count": change.count,
        "sentence": change.sentence(),
        "by_action": dict(change.by_action.most_common()),
        "by_rule": dict(change.by_rule.most_common()),
        "examples": [example_out(example, runs) for example in change.examples],
    }


def simulation_out(result: selectors.SimulationResult) -> dict[str, Any]:
    simulation = result.simulation
    return {
        "version": version_out(result.version),
        "baseline_version": result.baseline.number if result.baseline is not None else None,
        "days": result.days,
        "since": result.since,
        "total": simulation.total,
        "changed": simulation.changed,
        "sentences": simulation.sentences(),
        "current_outcomes": dict(sorted(simulation.current_outcomes.items())),
        "draft_outcomes": dict(sorted(simulation.draft_outcomes.items())),
        "rules": [
            {"rule": rule, "current": count.current, "draft": count.draft}
            for rule, count in simulation.rules.items()
        ],
        "changes": [change_out(change, result.runs) for change in simulation.changes],
        "recorded_differs": simulation.recorded_differs,
        "skipped": len(simulation.skipped),
        "capped": result.capped,
    }


# --- endpoints --------------------------------------------------------------------------------


@router.get("/", response={200: list[PolicyOut], **_errors(401, 403)}, summary="List policies")
def policy_list(request: HttpRequest) -> Any:
    return [policy_out(policy) for policy in selectors.policy_list_for_user(_user(request))]


# A policy's versions come before a version by id: "/versions/versions" is the versions of a
# policy named "versions" (a version's id is a number), never a POST refused with 405.
@router.get(
    "/{name}/versions",
    response={200: VersionPageOut, **_errors(401, 403, 404, 422)},
    summary="A policy's versions, newest first, with who wrote, reviewed and activated each and why",
)
def version_list(
    request: HttpRequest, query: Query[VersionPageQuery], name: str = _name_in_path()
) -> Any:
    page = selectors.policy_version_page_for_user(
        _user(request), name, before=query.before, limit=query.limit
    )
    return {
        "items": [version_out(version) for version in page.items],
        "next_before": page.next_before,
    }


@router.post(
    "/{name}/versions",
    response={201: VersionOut, **_errors(401, 403, 413, 422)},
    summary="Create a draft from a source (422 policy_invalid lists each problem with field, line, column)",
)
def version_draft(
    request: HttpRequest, payload: DraftIn, name: str = _name_in_path()
) -> Status[dict[str, Any]]:
    user = _user(request)
    selectors.policy_edit_check(user)
    version = services.policy_draft(
        source=payload.source, author=user, note=payload.note, policy_name=name
    )
    return Status(201, version_out(version))


@router.get(
    "/versions/{version_id}",
    response={200: VersionDetailOut, **_errors(401, 403, 404, 422)},
    summary="A version: its source, document, rules in words, status and history",
)
def version_detail(request: HttpRequest, version_id: int = _id_in_path()) -> Any:
    return version_detail_out(selectors.policy_version_get_for_user(_user(request), version_id))


@router.post(
    "/versions/{version_id}/submit",
    response={200: VersionOut, **_errors(401, 403, 404, 409, 422)},
    summary="Submit a draft for review",
)
def version_submit(request: HttpRequest, version_id: int = _id_in_path()) -> Any:
    user = _user(request)
    selectors.policy_edit_check(user)
    return version_out(services.policy_submit(version_id=version_id, user=user))


@router.post(
    "/versions/{version_id}/review",
    response={200: VersionOut, **_errors(401, 403, 404, 409, 422)},
    summary="Approve or reject a submitted version (not one you wrote; a rejection needs a note)",
)
def version_review(request: HttpRequest, payload: ReviewIn, version_id: int = _id_in_path()) -> Any:
    user = _user(request)
    selectors.policy_review_check(user)
    return version_out(
        services.policy_review(
            version_id=version_id, user=user, approve=payload.approve, note=payload.note
        )
    )


@router.post(
    "/versions/{version_id}/activate",
    response={200: VersionOut, **_errors(401, 403, 404, 409, 422)},
    summary="Put an approved version in force (four eyes: not one you wrote → 403 policy_four_eyes)",
)
def version_activate(
    request: HttpRequest, version_id: int = _id_in_path(), payload: ActivateIn | None = None
) -> Any:
    user = _user(request)
    selectors.policy_review_check(user)
    return version_out(
        services.policy_activate(
            version_id=version_id, user=user, note=payload.note if payload else ""
        )
    )


@router.post(
    "/versions/{version_id}/rollback",
    response={200: VersionOut, **_errors(401, 403, 404, 409, 422)},
    summary="Put back in force a version that was active before, saying why",
)
def version_rollback(
    request: HttpRequest, payload: RollbackIn, version_id: int = _id_in_path()
) -> Any:
    user = _user(request)
    selectors.policy_review_check(user)
    return version_out(
        services.policy_rollback(version_id=version_id, user=user, reason=payload.reason)
    )


@router.get(
    "/versions/{version_id}/simulation",
    response={200: SimulationOut, **_errors(401, 403, 404, 422)},
    summary="What a version would have decided differently from the active one over the last N days",
)
def version_simulate(
    request: HttpRequest, query: Query[SimulationQuery], version_id: int = _id_in_path()
) -> Any:
    result = selectors.policy_simulation_for_user(
        _user(request), version_id, days=query.days, examples=query.examples
    )
    return simulation_out(result)


@router.get(
    "/diff",
    response={200: DiffOut, **_errors(401, 403, 404, 422)},
    summary="A readable diff between two versions of a policy",
)
def version_diff(request: HttpRequest, query: Query[DiffQuery]) -> Any:
    old, new, diff = selectors.policy_version_diff_for_user(
        _user(request), query.from_version, query.to_version
    )
    return {
        "from_version": version_out(old),
        "to_version": version_out(new),
        "changes": list(diff.changes),
        "unified": diff.unified,
    }
