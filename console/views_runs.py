"""An operator's actions on a run from its page: retry a failed run from its failed step, skip
an escalated step with a value checked against its output contract, cancel a run that has not
ended. Each is a POST with CSRF and a required reason; the service decides (and audits) and
refuses with a code, shown on the page (a skip's beside its value)."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import plotly
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from orchestration import services
from orchestration.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from orchestration.models import Decision, Run, Step, Wait
from orchestration.selectors import run_get_for_decision
from policies.limits import price_cost

REASON_MAX = 2000


def _run_for_decision(user: User, run_id: int) -> Run:
    """The run ``user`` may act on, as a page sees it: 404 unseen, 403 seen but not theirs."""
    try:
        return run_get_for_decision(user, run_id)
    except NotFound:
        raise Http404(f"no run {run_id}") from None
    except PermissionDenied:
        raise DjangoPermissionDenied from None


def _act(request: HttpRequest, run_id: int, what: str) -> HttpResponse:
    user = cast(User, request.user)
    run = _run_for_decision(user, run_id)
    reason = request.POST.get("reason", "").strip()[:REASON_MAX]
    back = HttpResponseRedirect(reverse("console:run_detail", args=[run.pk]))
    back.status_code = 303
    if not reason:
        messages.error(request, f"Say why you {what} this run: a reason is required.")
        return back
    try:
        if what == "retry":
            services.run_retry(run_id=run.pk, user=user, reason=reason)
            messages.success(request, "Run retried from its failed step.")
        else:
            services.run_cancel(run_id=run.pk, user=user, reason=reason)
            messages.success(request, "Run cancelled.")
    except PermissionDenied:
        raise DjangoPermissionDenied from None
    except (Conflict, InvalidInput) as exc:
        messages.error(request, f"Not done ({exc.code}): {exc.message}")
    return back


@login_required
@require_POST
def run_retry(request: HttpRequest, run_id: int) -> HttpResponse:
    return _act(request, run_id, "retry")


@login_required
@require_POST
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    return _act(request, run_id, "cancel")


#: Where a refused skip waits for the page it redirects to (the value typed, and why).
SKIP_REFUSED = "run_skip_refused"


def _contract_errors(detail: Any) -> str:
    """A contract's refusal (pydantic's errors) as one line per field."""
    if not isinstance(detail, list):
        return ""
    return "; ".join(
        f"{'.'.join(map(str, e.get('loc', []))) or 'value'}: {e.get('msg', 'invalid')}"
        for e in detail
        if isinstance(e, dict)
    )


@login_required
@require_POST
def run_skip(request: HttpRequest, run_id: int) -> HttpResponse:
    """Skip an escalated step of the run (``wait``), or the failed step of a failed run
    (``failed_step=1``), with the value it should have produced."""
    user = cast(User, request.user)
    run = _run_for_decision(user, run_id)
    back = HttpResponseRedirect(reverse("console:run_detail", args=[run.pk]) + "#run-actions")
    back.status_code = 303
    failed_step = request.POST.get("failed_step") == "1"
    try:
        wait_id = 0 if failed_step else int(request.POST.get("wait", ""))
    except ValueError:
        messages.error(request, "Not done: say which escalation to skip.")
        return back
    raw = request.POST.get("value", "")
    reason = request.POST.get("reason", "").strip()[:REASON_MAX]

    def refused(error: str) -> HttpResponse:
        request.session[SKIP_REFUSED] = {
            "wait": wait_id,
            "failed_step": failed_step,
            "value": raw,
            "reason": reason,
            "error": error,
        }
        return back

    if not reason:
        return refused("Say why the step is skipped: a reason is required.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return refused(
            f"The value is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})."
        )
    output = value if isinstance(value, dict) else {"value": value}
    try:
        if failed_step:
            services.run_skip_failed_step(run_id=run.pk, user=user, reason=reason, output=output)
        else:
            services.escalation_resolve(
                wait_id=wait_id,
                user=user,
                action=Decision.SKIP,
                reason=reason,
                output=output,
                run_id=run.pk,
            )
    except NotFound:
        return refused(f"No open escalation {wait_id} on this run.")
    except PermissionDenied as exc:
        return refused(exc.message)
    except (Conflict, InvalidInput) as exc:
        detail = _contract_errors(exc.detail)
        return refused(f"{exc.message}" + (f": {detail}" if detail else ""))
    messages.success(request, "Step skipped with the value given; the run goes on.")
    return back


def skip_refused(request: HttpRequest) -> dict[str, Any] | None:
    """The refused skip to show on the run page, once."""
    refused = request.session.pop(SKIP_REFUSED, None)
    return refused if isinstance(refused, dict) else None


# --- the run timeline -------------------------------------------------------------------------------

#: Plotly's bundle, served from the installed package (no CDN, no copy in the repository).
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_VERSION = plotly.__version__


def plotly_js(request: HttpRequest, version: str) -> HttpResponse:
    """The installed plotly.min.js; its URL names the version, so it is cached for a year."""
    if version != PLOTLY_VERSION:
        raise Http404("another plotly version")
    response = FileResponse(PLOTLY_JS.open("rb"), content_type="text/javascript; charset=utf-8")
    response["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


#: A rule of the style sheet plotly.min.js builds at load time: "selector":"declarations", either
#: quoted either way, or a bare placeholder (X stands for the plot, Y for the notifier).
_PLOTLY_RULE = re.compile(r"""(?:"([^"]*)"|([A-Z])):(?:"([^"]*)"|'([^']*)')""")
#: A style sheet the bundle adds as a <style> element unless an element with its id exists.
_PLOTLY_GUARDED_STYLE = re.compile(
    r'if\(!document\.getElementById\("([0-9a-f]{16,})"\)\)\{var (\w+)=document\.createElement'
    r'\("style"\);\2\.id="\1",\2\.textContent=`([^`]*)`'
)


@dataclass(frozen=True)
class PlotlyStyles:
    """What plotly.min.js would put in <style> elements, which our CSP refuses (no inline
    styles): its rules, served as a style sheet, and the ids of the elements whose presence
    tells the bundle not to add its own (the page carries them)."""

    css: str
    ids: tuple[str, ...]


@functools.cache
def plotly_styles() -> PlotlyStyles:
    """Read from the installed bundle, so they always match its version. The page links the
    sheet with the id and class Plotly looks for ("plotly.js-style-global", "no-inline-styles")
    and carries an element with each guarded sheet's id."""
    bundle = PLOTLY_JS.read_text(encoding="utf-8")
    rules = []
    start = bundle.find('{"X,X div":')
    end = bundle.find("};", start)
    if start >= 0 and end >= 0:
        for match in _PLOTLY_RULE.finditer(bundle, start + 1, end):
            selector = (match.group(1) or match.group(2)).removeprefix(",")
            selector = selector.replace("X", ".js-plotly-plot .plotly")
            rules.append(
                f"{selector.replace('Y', '.plotly-notifier')} {{{match.group(3) or match.group(4)}}}\n"
            )
    ids = []
    for match in _PLOTLY_GUARDED_STYLE.finditer(bundle):
        ids.append(match.group(1))
        rules.append(match.group(3) + "\n")
    return PlotlyStyles("".join(rules), tuple(ids))


def plotly_css(request: HttpRequest, version: str) -> HttpResponse:
    """Plotly's style sheets as one file (see :func:`plotly_styles`), cached as the bundle is."""
    if version != PLOTLY_VERSION:
        raise Http404("another plotly version")
    response = HttpResponse(plotly_styles().css, content_type="text/css; charset=utf-8")
    response["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def run_timeline(steps: list[Step], waits: list[Wait], now: datetime) -> dict[str, Any]:
    """What the timeline draws (read by static/console/run_timeline.js): per step its queued,
    running and waiting spans, and the moments its attempts failed."""
    bars: list[dict[str, Any]] = []
    marks: list[dict[str, Any]] = []
    for step in steps:
        end = step.finished_at or now
        if step.started_at and step.started_at > step.created_at:
            bars.append(
                {
                    "step": step.key,
                    "phase": "queued",
                    "from": _iso(step.created_at),
                    "to": _iso(step.started_at),
                }
            )
        if step.started_at:
            bars.append(
                {
                    "step": step.key,
                    "phase": step.status,
                    "from": _iso(step.started_at),
                    "to": _iso(end),
                }
            )
        for entry in step.attempts_log or []:
            if isinstance(entry, dict) and entry.get("at"):
                marks.append(
                    {
                        "step": step.key,
                        "at": entry["at"],
                        "label": f"attempt failed: {entry.get('code', '')}",
                    }
                )
    keys = {step.pk: step.key for step in steps}
    for wait in waits:
        bars.append(
            {
                "step": keys.get(wait.step_id, ""),
                "phase": f"waiting ({wait.kind})",
                "from": _iso(wait.created_at),
                "to": _iso(wait.decided_at or now),
            }
        )
    return {"bars": bars, "marks": marks}


# --- per step: inputs and outputs, the operator's edit, tool calls, policy decisions, cost ----------


def field_diff(before: Any, after: Any, prefix: str = "") -> list[dict[str, Any]]:
    """A readable field-level diff of two JSON values: one row per changed, added or removed
    field (nested objects by dotted path)."""
    if isinstance(before, dict) and isinstance(after, dict):
        rows: list[dict[str, Any]] = []
        for key in sorted(set(before) | set(after), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in after:
                rows.append(
                    {"field": path, "change": "removed", "before": before[key], "after": None}
                )
            elif key not in before:
                rows.append({"field": path, "change": "added", "before": None, "after": after[key]})
            else:
                rows.extend(field_diff(before[key], after[key], path))
        return rows
    if before != after:
        return [
            {"field": prefix or "(value)", "change": "changed", "before": before, "after": after}
        ]
    return []


def step_cost(usage: Any, policy: Any) -> dict[str, Any]:
    """A step's usage as money when the active policy prices its model, else token counts."""
    usage = usage if isinstance(usage, dict) else {}
    tokens_in = int(usage.get("prompt_tokens") or 0)
    tokens_out = int(usage.get("completion_tokens") or 0)
    model = str(usage.get("model") or "")
    money: Decimal | None = None
    if policy is not None and model:
        money = price_cost(policy.compiled, model, tokens_in, tokens_out)
    return {"model": model, "tokens_in": tokens_in, "tokens_out": tokens_out, "money": money}


def step_details(
    steps: list[Step], waits: list[Wait], tool_calls: list[Any], decisions: list[Any], policy: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per step what the page shows under it, and the run's total cost."""
    calls: dict[int, list[Any]] = {}
    for call in tool_calls:
        calls.setdefault(call.step_id, []).append(call)
    decided: dict[int, list[Any]] = {}
    for decision in decisions:
        decided.setdefault(decision.step_id, []).append(decision)
    edits: dict[int, list[dict[str, Any]]] = {}
    for wait in waits:
        if wait.edited_input is not None and isinstance(wait.action, dict):
            edits[wait.step_id] = field_diff(wait.action.get("input"), wait.edited_input)
    details = []
    total_money = Decimal(0)
    priced = True
    tokens_in = tokens_out = 0
    for step in steps:
        cost = step_cost(step.usage, policy)
        tokens_in += cost["tokens_in"]
        tokens_out += cost["tokens_out"]
        if cost["money"] is not None:
            total_money += cost["money"]
        elif cost["tokens_in"] or cost["tokens_out"]:
            priced = False
        details.append(
            {
                "step": step,
                "tool_calls": calls.get(step.pk, []),
                "decisions": decided.get(step.pk, []),
                "edit": edits.get(step.pk),
                "cost": cost,
            }
        )
    total = {
        "money": total_money if priced and policy is not None else None,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
    }
    return details, total
