"""The console's pages: the run list and a run's page. Reads go through selectors, which also
decide what the user may see; the websocket consumers re-render the same fragments."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import BadRequest
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.http import urlencode

from audit.selectors import audit_events_for_run
from console.graph_svg import graph_svg, node_states
from console.history import actor as history_actor
from console.history import sentence as history_sentence
from console.views_runs import (
    PLOTLY_VERSION,
    plotly_styles,
    run_timeline,
    skip_refused,
    step_details,
)
from orchestration.compensation import UNDO
from orchestration.errors import InvalidInput, NotFound, PermissionDenied, UnknownWorkflow
from orchestration.models import Run, RunStatus, Step, StepKind, Wait, WaitKind, WaitStatus
from orchestration.registry import workflow_get
from orchestration.selectors import (
    capability_status_list_for_user,
    may_decide,
    run_events,
    run_get_for_user,
    run_list_for_user,
    run_policy_decisions,
    run_retry_point,
    run_state_history,
    run_steps,
    run_tool_calls,
    run_waits,
)
from policies.active import active_policy
from policies.tenants import tenant_by_id

PAGE_SIZE = 50
#: A run page shows at most this many audit events (fan-out runs can have thousands).
AUDIT_EVENTS_SHOWN = 500


def _user(request: HttpRequest) -> User:
    # Behind login_required, so never the anonymous user.
    return cast(User, request.user)


# --- run list ---------------------------------------------------------------------------------------


def _status_filter(raw: str | None) -> str:
    return raw if raw in RunStatus.values else ""


def _waiting_filter(raw: str | None) -> str:
    return raw if raw in WaitKind.values else ""


#: The run list's "waiting for" choices, in the words the home page uses.
WAITING_CHOICES = [
    (WaitKind.APPROVAL.value, "a decision"),
    (WaitKind.EVENT.value, "an outside event"),
    (WaitKind.ESCALATION.value, "an operator (escalated)"),
]


def run_list_context(
    user: User, *, status: str = "", waiting: str = "", cursor: str | None = None
) -> dict[str, Any]:
    try:
        page = run_list_for_user(
            user,
            status=[status] if status else None,
            waiting_for=waiting or None,
            cursor=cursor,
            limit=PAGE_SIZE,
        )
    except InvalidInput as exc:
        raise BadRequest(exc.message) from exc
    filters = {k: v for k, v in (("status", status), ("waiting", waiting)) if v}
    next_url = None
    if page.next_cursor:
        next_url = "?" + urlencode({**filters, "cursor": page.next_cursor})
    return {
        "runs": page.items,
        "status": status,
        "statuses": RunStatus.choices,
        "waiting": waiting,
        "waiting_choices": WAITING_CHOICES,
        "live_query": urlencode(filters),
        "next_url": next_url,
        "first_page": cursor is None,
        "first_url": "?" + urlencode(filters),
    }


def run_list_fragment(user: User, *, status: str = "", waiting: str = "") -> str:
    """The first page's table, marked for an out-of-band swap (sent over the websocket)."""
    context = run_list_context(
        user, status=_status_filter(status), waiting=_waiting_filter(waiting)
    )
    return render_to_string("console/partials/run_table.html", {**context, "oob": True})


@login_required
def run_list(request: HttpRequest) -> HttpResponse:
    context = run_list_context(
        _user(request),
        status=_status_filter(request.GET.get("status")),
        waiting=_waiting_filter(request.GET.get("waiting")),
        cursor=request.GET.get("cursor") or None,
    )
    return render(request, "console/run_list.html", context)


# --- run page -----------------------------------------------------------------------------------------


def _when(value: Any) -> datetime | None:
    """An ISO timestamp kept in JSON (an attempt's ``at``) as a datetime, for ``utc_time``."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def escalation_panel(wait: Wait, step: Step) -> dict[str, Any]:
    """What the run page shows of an open escalation: its frozen context, made readable."""
    context = wait.action if isinstance(wait.action, dict) else {}
    error = context.get("error") if isinstance(context.get("error"), dict) else {}
    attempts = [
        {**entry, "when": _when(entry.get("at"))}
        for entry in context.get("attempts") or []
        if isinstance(entry, dict)
    ]
    tool_calls = [
        {**call, "when": _when(call.get("at"))}
        for call in context.get("tool_calls") or []
        if isinstance(call, dict)
    ]
    return {
        "wait": wait,
        "step": step,
        "why": context.get("why", ""),
        "compensation": bool(context.get("compensation")),
        "error": error,
        "error_class": error.get("class", "") if error else "",
        "attempts": attempts,
        "tool_calls": tool_calls,
        "agents_tried": context.get("agents_tried") or [],
        "fallback": context.get("fallback"),
        "skip_contract": context.get("skip_contract", ""),
    }


def run_detail_context(run: Run) -> dict[str, Any]:
    steps = run_steps(run)
    step_keys = {step.pk: step.key for step in steps}
    for step in steps:
        # A compensation reads as what it undoes: "undo: reserve".
        step.undoes = (  # type: ignore[attr-defined]  # for the template only, not a model field
            step_keys.get(step.parent_id or 0, step.key.removeprefix(UNDO))
            if step.kind == StepKind.COMPENSATE
            else ""
        )
    waits = run_waits(run)
    by_id = {step.pk: step for step in steps}
    escalations = [
        escalation_panel(wait, by_id[wait.step_id])
        for wait in waits
        if wait.kind == WaitKind.ESCALATION and wait.status == WaitStatus.OPEN
    ]
    audit = list(audit_events_for_run(run.pk)[: AUDIT_EVENTS_SHOWN + 1])
    for event in audit:
        event.step_key = step_keys.get(event.step_id or 0, "")  # type: ignore[attr-defined]  # for the template only, not model fields
        event.sentence = history_sentence(event, event.step_key)  # type: ignore[attr-defined]  # as above
        event.who, event.who_title = history_actor(event)  # type: ignore[attr-defined]  # as above
    current_state = [
        {"key": key, "version": run.state_versions.get(key, 0), "value": value}
        for key, value in sorted(run.state.items())
    ]
    return {
        "run": run,
        "tenant": tenant_by_id(run.tenant_id),
        "steps": steps,
        "current_state": current_state,
        "state_history": run_state_history(run),
        "waits": waits,
        "escalations": escalations,
        "events": run_events(run),
        "audit": audit[:AUDIT_EVENTS_SHOWN],
        "audit_truncated": len(audit) > AUDIT_EVENTS_SHOWN,
        "is_active": not run.is_terminal,
        "graph": run_graph(run, steps, {e["wait"].step_id for e in escalations}),
    }


def run_live_fragment(user: User, run_id: int, *, include_io: bool = False) -> str | None:
    """The run page's changing sections as out-of-band fragments; None if the run is not
    (or no longer) visible to ``user``."""
    try:
        run = run_get_for_user(user, run_id)
    except NotFound:
        return None
    context = {
        **run_detail_context(run),
        "oob": True,
        "include_io": include_io,
        "may_act": may_decide(user, run),
    }
    return render_to_string("console/partials/run_live.html", context)


@login_required
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    try:
        run = run_get_for_user(_user(request), run_id)
    except NotFound:
        raise Http404(f"no run {run_id}") from None
    context = {**run_detail_context(run), "may_act": may_decide(_user(request), run)}
    if run.status == RunStatus.FAILED:
        context["skip_point"], _ = run_retry_point(run, context["steps"])
    refused = skip_refused(request)
    open_escalations = {e["wait"].pk for e in context["escalations"]}
    if refused is not None and refused.get("wait") in open_escalations:
        context["skip_refused"] = refused  # shown beside its value
    elif refused is not None and refused.get("failed_step") and context.get("skip_point"):
        context["skip_failed_refused"] = refused
    elif refused is not None:
        context["skip_refused_closed"] = refused.get("error", "")  # its form is gone
    context["timeline"] = run_timeline(context["steps"], context["waits"], timezone.now())
    context["plotly_version"] = PLOTLY_VERSION
    context["plotly_style_ids"] = plotly_styles().ids
    context["step_details"], context["run_cost"] = step_details(
        context["steps"],
        context["waits"],
        run_tool_calls(run),
        run_policy_decisions(run),
        active_policy(),
    )
    return render(request, "console/run_detail.html", context)


@login_required
def tool_list(request: HttpRequest) -> HttpResponse:
    """Capabilities, their providers, recent health, rate-limit headroom and circuit state."""
    try:
        capabilities = capability_status_list_for_user(_user(request))
    except PermissionDenied:
        raise DjangoPermissionDenied from None
    return render(request, "console/tool_list.html", {"capabilities": capabilities})


def run_graph(run: Run, steps: list[Step], escalated_steps: set[int]) -> str:
    """The run's workflow graph as inline SVG, each node in its state (empty if the workflow
    is no longer registered)."""
    try:
        wf = workflow_get(run.workflow_name, run.workflow_version)
    except UnknownWorkflow:  # no longer registered: the page goes on without the graph
        return ""
    states, anchors, notes = node_states(steps, escalated_steps)
    return graph_svg(wf, states, anchors=anchors, notes=notes)
