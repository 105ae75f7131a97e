"""Home ("what needs me now") and the decision inbox: approvals and escalations a person may
decide, soonest deadline first, with claims, edits checked against the agent's contract and bulk
approval. Reads and authorization go through selectors, writes through services."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_http_methods, require_POST

from console.api import error_status, policy_error_status
from console.readable import error_fields, readable_rows, schema_example, truncated
from orchestration.errors import NotFound, SignalboxError
from orchestration.models import Decision, RunStatus, Wait, WaitKind, WaitStatus
from orchestration.registry import agent_class
from orchestration.selectors import (
    ESCALATION_REASONS,
    HomeFilters,
    home_counts_for_user,
    home_runs_for_user,
    inbox_count_for_user,
    inbox_for_user,
    inbox_item_for_user,
    latest_event_id,
    run_scope,
    run_spend,
    run_steps,
    user_tier,
    wait_ceiling_hit,
    wait_deciders,
)
from orchestration.services import (
    approval_decide,
    approvals_decide_bulk,
    escalation_raise_ceiling,
    escalation_resolve,
    wait_claim,
    wait_release,
)
from policies.errors import PolicyError
from policies.models import Tenant
from policies.spend_selectors import may_raise_ceiling

AGE_CHOICES = ((0, "any age"), (1, "last hour"), (24, "last day"), (168, "last week"))


def _user(request: HttpRequest) -> User:
    return cast(User, request.user)


def _int(raw: str | None, default: int = 0) -> int:
    try:
        return int(raw or default)
    except ValueError:
        return default


# --- home ---------------------------------------------------------------------------------------


def home_filters(params: Any) -> HomeFilters:
    status = params.get("status") or ""
    return HomeFilters(
        workflow=(params.get("workflow") or "")[:100],
        tenant=(params.get("tenant") or "")[:100],
        status=status if status in RunStatus.values else "",
        agent=(params.get("agent") or "")[:100],
        age_hours=_int(params.get("age")) if _int(params.get("age")) in dict(AGE_CHOICES) else 0,
        tier=_int(params.get("tier")) if _int(params.get("tier")) in (1, 2, 3) else 0,
    )


def home_context(user: User, params: Any) -> dict[str, Any]:
    filters = home_filters(params)
    counts = home_counts_for_user(user, filters)
    page = home_runs_for_user(user, filters, page=_int(params.get("page"), 1), counts=counts)
    query = {
        k: v
        for k, v in (
            ("workflow", filters.workflow),
            ("tenant", filters.tenant),
            ("status", filters.status),
            ("agent", filters.agent),
            ("age", filters.age_hours or ""),
            ("tier", filters.tier or ""),
        )
        if v
    }

    def page_url(n: int) -> str:
        return "?" + urlencode({**query, "page": n})

    return {
        "filters": filters,
        "counts": counts,
        "status_counts": [
            (value, label, counts.by_status.get(value, 0)) for value, label in RunStatus.choices
        ],
        "reasons": [
            (label, counts.escalated_by_reason.get(label, 0)) for label, _ in ESCALATION_REASONS
        ],
        "page": page,
        "prev_url": page_url(page.page - 1) if page.page > 1 else None,
        "next_url": page_url(page.page + 1) if page.page < page.pages else None,
        "statuses": RunStatus.choices,
        "ages": AGE_CHOICES,
        "query": urlencode(query),
        "filtered": bool(query),
    }


def home_fragment(user: User, query_string: str) -> str:
    context = home_context(user, QueryDict(query_string))
    return render_to_string("console/partials/home_live.html", {**context, "oob": True})


@login_required
def home(request: HttpRequest) -> HttpResponse:
    context = home_context(_user(request), request.GET)
    context["tenants"] = list(Tenant.objects.order_by("slug").values_list("slug", flat=True)[:200])
    return render(request, "console/home.html", context)


# --- inbox --------------------------------------------------------------------------------------


INBOX_KINDS = ((WaitKind.APPROVAL, "approvals"), (WaitKind.ESCALATION, "escalations"))


#: Items per inbox page: a shift's worth at a glance, and quick to render with 100k runs.
INBOX_PAGE = 50


def inbox_context(user: User, params: Any = None) -> dict[str, Any]:
    """The inbox, narrowed by its filters (GET parameters ``kind`` and ``tier``)."""
    params = params if params is not None else QueryDict()
    kind = params.get("kind") or ""
    kind = kind if kind in dict(INBOX_KINDS) else ""
    tier = _int(params.get("tier")) if _int(params.get("tier")) in (1, 2, 3) else 0
    page = max(1, min(_int(params.get("page")) or 1, 10_000))
    offset = (page - 1) * INBOX_PAGE
    scope = run_scope(user)  # read once for the list and its count
    items = inbox_for_user(
        user, kind=kind, tier=tier, offset=offset, limit=INBOX_PAGE + 1, scope=scope
    )
    more = len(items) > INBOX_PAGE
    items = items[:INBOX_PAGE]
    # One page and nothing before it: its length is the count (no query for it).
    total = (
        inbox_count_for_user(user, kind=kind, tier=tier, scope=scope)
        if more or page > 1
        else len(items)
    )
    query = urlencode({k: v for k, v in (("kind", kind), ("tier", tier or "")) if v})
    return {
        "items": items,
        "page": page,
        "total": total,
        "first_shown": offset + 1 if items else 0,
        "last_shown": offset + len(items),
        "next_page": page + 1 if more else None,
        "previous_page": page - 1 if page > 1 else None,
        "live_query": urlencode(
            {
                k: v
                for k, v in (
                    ("kind", kind),
                    ("tier", tier or ""),
                    ("page", page if page > 1 else ""),
                )
                if v
            }
        ),
        "tier": user_tier(user),
        "last_event_id": latest_event_id(),
        "kinds": INBOX_KINDS,
        "filter_kind": kind,
        "filter_tier": tier,
        "query": query,
        "filtered": bool(query),
    }


def inbox_fragment(user: User, query_string: str = "") -> str:
    context = inbox_context(user, QueryDict(query_string))
    return render_to_string("console/partials/inbox_list.html", {**context, "oob": True})


@login_required
def inbox(request: HttpRequest) -> HttpResponse:
    context = inbox_context(_user(request), request.GET)
    context["bulk"] = request.session.pop("inbox_bulk", None)
    return render(request, "console/inbox.html", context)


def _schema_fields(
    schema: dict[str, Any], values: dict[str, Any], errors: dict[str, str]
) -> list[dict[str, Any]]:
    """Form fields generated from a JSON Schema's top-level properties."""
    required = set(schema.get("required", []))
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type") or "json"
        value = values.get(name, prop.get("default", ""))
        widget = {
            "string": "text",
            "integer": "number",
            "number": "number",
            "boolean": "checkbox",
        }.get(kind, "json")
        if widget == "text" and "enum" in prop:
            widget = "select"
        fields.append(
            {
                "name": name,
                "label": prop.get("title") or name.replace("_", " "),
                "help": prop.get("description", ""),
                "widget": widget,
                "type": kind,
                "choices": prop.get("enum", []),
                "value": json.dumps(value) if widget == "json" else value,
                "required": name in required,
                "error": errors.get(name, ""),
                "step": "any" if kind == "number" else "1",
            }
        )
    return fields


def _field_values(
    fields_schema: dict[str, Any], post: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """The posted edit form as the agent's input (types from the schema), and errors for values
    that are not even of the right shape (the contract checks the rest)."""
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, prop in (fields_schema.get("properties") or {}).items():
        kind = prop.get("type") or "json"
        raw = post.get(f"field_{name}")
        if kind == "boolean":
            values[name] = raw == "on"
            continue
        if raw is None or raw == "":
            continue
        if kind == "string":
            values[name] = raw
        elif kind in ("integer", "number"):
            try:
                values[name] = int(raw) if kind == "integer" else float(raw)
            except ValueError:
                values[name] = raw  # the contract says what is wrong
        else:
            try:
                values[name] = json.loads(raw)
            except json.JSONDecodeError:
                errors[name] = "not valid JSON"
    return values, errors


def _errors_by_field(detail: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for error in detail if isinstance(detail, list) else []:
        loc = error.get("loc") or ["__all__"]
        out.setdefault(str(loc[0]), error.get("msg", "invalid"))
    return out


def _decided_by(wait: Wait) -> str:
    if wait.decided_by:
        return wait.decided_by.get_username()
    return "the system" if wait.decided_at else ""


def item_context(
    user: User,
    wait_id: int,
    *,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    message: str = "",
    skip_value: str = "",
    reason: str = "",
) -> dict[str, Any]:
    try:
        item = inbox_item_for_user(user, wait_id)
    except NotFound:
        raise Http404(f"no approval or escalation {wait_id}") from None
    wait = item.wait
    action = wait.action if isinstance(wait.action, dict) else {}
    fields: list[dict[str, Any]] = []
    if wait.kind == WaitKind.APPROVAL and wait.step.agent:
        try:
            schema = agent_class(wait.step.agent).Input.model_json_schema()
        except SignalboxError:
            schema = {}
        proposed = action.get("input") if isinstance(action.get("input"), dict) else {}
        fields = _schema_fields(schema, values if values is not None else proposed, errors or {})
    is_open = wait.status == WaitStatus.OPEN
    deciders, deciders_all = wait_deciders(wait) if is_open and not item.actionable else ([], 0)
    shown = action.get("input", action)
    cut = truncated(shown)
    return {
        "item": item,
        "wait": wait,
        "run": wait.run,
        "action": action,
        "action_json": json.dumps(shown, indent=2, sort_keys=True, default=str),
        "action_rows": [] if cut else readable_rows(shown),
        "action_cut": cut,
        "skip_example": schema_example(action.get("skip_schema")),
        "deciders": deciders,
        "deciders_more": deciders_all - len(deciders),
        "attempts": action.get("attempts") or [],
        "error_fields": error_fields(action.get("error")),
        "steps": run_steps(wait.run),
        "spend": run_spend(wait.run),
        "ceiling": _ceiling_hit(user, wait, values if wait.kind == WaitKind.ESCALATION else None),
        "fields": fields,
        "errors": errors or {},
        "message": message,
        "skip_value": skip_value,
        "reason": reason,
        "is_open": is_open,
        "decided_by": _decided_by(wait),
        "last_event_id": latest_event_id(),
    }


#: A ceiling's scope in words, as the item page names it ("... daily ceiling").
SCOPE_LABELS = {
    "run": "the run's",
    "workflow_day": "the workflow's daily",
    "agent_day": "the agent's daily",
    "tenant_month": "the tenant's monthly",
    "global_day": "the global daily",
}


def _ceiling_hit(user: User, wait: Wait, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the item page says of the cost ceiling an escalation stopped at, or None: the
    scope, its figures, the least new limit that lets the call through (the form's default,
    unless ``values`` holds what was posted), and whether ``user`` may raise it."""
    hit = wait_ceiling_hit(wait)
    if hit is None:
        return None
    money = {}
    for name in ("limit", "spent", "reserved", "amount"):
        try:
            money[name] = Decimal(str(hit.get(name, "")))
        except InvalidOperation:
            money[name] = None
    needed = (
        money["spent"] + money["reserved"] + money["amount"]
        if None not in (money["spent"], money["reserved"], money["amount"])
        else None
    )
    posted = (values or {}).get("new_limit")
    return {
        **money,
        "kind": hit.get("kind", ""),
        "label": SCOPE_LABELS.get(str(hit.get("kind")), "a shared"),
        "key": hit.get("key", ""),
        "own": hit.get("kind") == "run",
        "needed": needed,
        "new_limit": posted if posted is not None else ("" if needed is None else str(needed)),
        "may_raise": may_raise_ceiling(user),
    }


def inbox_item_run_id(user: User, wait_id: int) -> int | None:
    """The run of an item ``user`` may see (its page's live group), or None."""
    try:
        return inbox_item_for_user(user, wait_id).wait.run_id
    except NotFound:
        return None


def inbox_item_fragment(user: User, wait_id: int) -> str | None:
    """The item page's live part (its claim, and whether it is still open), or None when the
    user may no longer see it."""
    try:
        item = inbox_item_for_user(user, wait_id)
    except NotFound:
        return None
    wait = item.wait
    context = {
        "item": item,
        "wait": wait,
        "is_open": wait.status == WaitStatus.OPEN,
        "decided_by": _decided_by(wait),
        "last_event_id": latest_event_id(),
        "oob": True,
    }
    return render_to_string("console/partials/inbox_item_live.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def inbox_item(request: HttpRequest, wait_id: int) -> HttpResponse:
    user = _user(request)
    if request.method == "GET":
        return render(request, "console/inbox_item.html", item_context(user, wait_id))
    op = request.POST.get("op", "")
    reason = request.POST.get("reason", "")
    values: dict[str, Any] | None = None
    field_errors: dict[str, str] = {}
    skip_value = request.POST.get("skip_value", "")
    decided: Wait | None = None
    try:
        if op == "claim":
            wait_claim(wait_id=wait_id, user=user)
        elif op == "release":
            wait_release(wait_id=wait_id, user=user)
        elif op in (Decision.APPROVE, Decision.REJECT):
            decided = approval_decide(wait_id=wait_id, user=user, decision=op, reason=reason)
        elif op == Decision.EDIT:
            item = inbox_item_for_user(user, wait_id)
            schema = agent_class(item.wait.step.agent).Input.model_json_schema()
            values, field_errors = _field_values(schema, request.POST)
            if not field_errors:
                decided = approval_decide(
                    wait_id=wait_id, user=user, decision=op, reason=reason, edited_input=values
                )
        elif op in (Decision.RETRY, Decision.ABORT):
            decided = escalation_resolve(wait_id=wait_id, user=user, action=op, reason=reason)
        elif op == RAISE_CEILING:
            raw = request.POST.get("new_limit", "").strip()
            values = {"new_limit": raw}
            try:
                new_limit = Decimal(raw)
            except InvalidOperation:
                field_errors["new_limit"] = "a number of dollars, e.g. 0.0025"
            else:
                if not new_limit.is_finite() or new_limit <= 0:
                    field_errors["new_limit"] = "a number of dollars above 0, e.g. 0.0025"
                else:
                    decided = escalation_raise_ceiling(
                        wait_id=wait_id, user=user, new_limit=new_limit, reason=reason
                    )
        elif op == Decision.SKIP:
            try:
                output = json.loads(skip_value or "null")
            except json.JSONDecodeError:
                field_errors["skip_value"] = "not valid JSON"
            else:
                decided = escalation_resolve(
                    wait_id=wait_id,
                    user=user,
                    action=op,
                    reason=reason,
                    output=output if isinstance(output, dict) else {"value": output},
                )
        else:
            return render(
                request,
                "console/inbox_item.html",
                item_context(user, wait_id, message=f"unknown action {op!r}"),
                status=400,
            )
    except NotFound:
        raise Http404(f"no approval or escalation {wait_id}") from None
    except PolicyError as exc:  # the ledger's refusal of a raise: too low, no tier, a bad amount
        errors = {**field_errors}
        if op == RAISE_CEILING:
            errors["new_limit"] = exc.message
        context = item_context(
            user, wait_id, values=values, errors=errors, message=exc.message, reason=reason
        )
        return render(request, "console/inbox_item.html", context, status=policy_error_status(exc))
    except SignalboxError as exc:
        errors = {**field_errors, **_errors_by_field(exc.detail)}
        if op == Decision.SKIP and exc.detail and isinstance(exc.detail, list):
            errors["skip_value"] = "; ".join(
                f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in exc.detail
            )
        context = item_context(
            user,
            wait_id,
            values=values,
            errors=errors,
            message=exc.message,
            skip_value=skip_value,
            reason=reason,
        )
        return render(request, "console/inbox_item.html", context, status=error_status(exc))
    if field_errors:
        context = item_context(
            user,
            wait_id,
            values=values,
            errors=field_errors,
            message="some fields are not valid",
            skip_value=skip_value,
            reason=reason,
        )
        return render(request, "console/inbox_item.html", context, status=422)
    if op in ("claim", "release"):
        return HttpResponseRedirect(reverse("console:inbox_item", args=[wait_id]))
    if decided is not None:
        messages.success(request, _decided_message(decided, op))
    return HttpResponseRedirect(reverse("console:inbox"))


#: What the inbox says after a decision taken on an item's page, by operation.
DONE = {
    Decision.APPROVE: "approved",
    Decision.EDIT: "approved with your edit",
    Decision.REJECT: "rejected",
    Decision.RETRY: "sent back to be retried",
    Decision.SKIP: "skipped with your value",
    Decision.ABORT: "resolved: its run is aborted",
    "raise_ceiling": "answered: its run's ceiling is raised and the step retried",
}

#: The item page's operation that raises the run's ceiling, then retries (not a ``Decision``:
#: what the escalation records is the retry).
RAISE_CEILING = "raise_ceiling"


def _decided_message(wait: Wait, op: str) -> str:
    """The line the inbox shows after a decision on ``wait`` (as the service left it): what was
    done, or that the approval waits for another person's vote."""
    where = f"{wait.run.workflow_name} {wait.step.node}, run #{wait.run_id}"
    what = f"{wait.kind.capitalize()} #{wait.pk} ({where})"
    if wait.status == WaitStatus.OPEN:
        return (
            f"{what}: your approval is recorded; it needs another person's before the run goes on."
        )
    return f"{what} {DONE.get(op, 'decided')}."


@login_required
@require_POST
def inbox_bulk(request: HttpRequest) -> HttpResponse:
    ids = [_int(v) for v in request.POST.getlist("wait") if _int(v) > 0]
    try:
        outcomes = approvals_decide_bulk(
            wait_ids=ids,
            user=_user(request),
            decision=request.POST.get("decision", Decision.APPROVE),
            reason=request.POST.get("reason", ""),
        )
    except SignalboxError as exc:
        context = inbox_context(_user(request))
        context["bulk_error"] = exc.message
        return render(request, "console/inbox.html", context, status=400)
    request.session["inbox_bulk"] = [
        {"wait_id": o.wait_id, "ok": o.ok, "message": o.message} for o in outcomes
    ]
    return HttpResponseRedirect(reverse("console:inbox"))
