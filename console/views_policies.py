"""The policy pages: policies and their versions, a version with the actions its reader may
take, the editor (YAML with problems at their lines, and a form per kind of item), the diff
between any two versions and the simulation of a version against recorded decisions.

Reads and permission checks go through ``policies.selectors``, writes through
``policies.services``. Policy admins and auditors read; only policy admins see and use the
write actions; anyone else gets a 403 page that says so.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, cast

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from console.policy_forms import ITEM_FORMS, ItemForm
from policies import selectors, services
from policies.diff import rule_summary
from policies.document import PolicyDocument
from policies.edits import DocumentEditError, document_item, document_upsert, item_identities
from policies.errors import (
    Code,
    PolicyConflict,
    PolicyDenied,
    PolicyError,
    PolicyInvalidQuery,
    PolicyNotFound,
)
from policies.models import PolicyStatus, PolicyVersion
from policies.services import DEFAULT_POLICY
from policies.source import (
    PolicySourceError,
    SourceProblem,
    policy_source_parse,
    policy_source_render,
)

#: The HTTP status of a version page re-rendered with a refusal (four eyes, a wrong state).
REFUSAL_STATUS = {
    PolicyDenied: 403,
    PolicyNotFound: 404,
    PolicyConflict: 409,
    PolicyInvalidQuery: 422,
}


#: Refusals of the role itself (rather than of this action on this version).
ROLE_REFUSALS = frozenset({Code.READ_DENIED, Code.EDIT_DENIED, Code.REVIEW_DENIED})


def _user(request: HttpRequest) -> User:
    return cast(User, request.user)


def _forbidden(request: HttpRequest, message: str) -> HttpResponse:
    return render(request, "console/policies/forbidden.html", {"message": message}, status=403)


def policy_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A policy page: logged in; a refusal is a 403 page that says why, an unknown object a 404."""

    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return view(request, *args, **kwargs)
        except PolicyDenied as exc:
            return _forbidden(request, exc.message)
        except PolicyNotFound as exc:
            raise Http404(exc.message) from None
        except PolicyInvalidQuery as exc:
            return render(
                request,
                "console/policies/forbidden.html",
                {"message": exc.message, "title": "That cannot be shown"},
                status=400,
            )

    return wrapper


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw else None
    except ValueError:
        return None


# --- lists ------------------------------------------------------------------------------------


@require_GET
@policy_page
def policy_list(request: HttpRequest) -> HttpResponse:
    policies = list(selectors.policy_list_for_user(_user(request)))
    return render(
        request,
        "console/policies/policy_list.html",
        {
            "policies": policies,
            "abilities": selectors.policy_abilities(_user(request)),
            "default_policy": DEFAULT_POLICY,
        },
    )


@require_GET
@policy_page
def version_list(request: HttpRequest, name: str) -> HttpResponse:
    user = _user(request)
    before = _int(request.GET.get("before"))
    page = selectors.policy_version_page_for_user(user, name, before=before, limit=50)
    policy = page.items[0].policy if page.items else selectors.policy_get_for_user(user, name)
    return render(
        request,
        "console/policies/version_list.html",
        {
            "policy": policy,
            "versions": page.items,
            "next_before": page.next_before,
            "first_page": before is None,
            "abilities": selectors.policy_abilities(user),
        },
    )


# --- a version and its actions ----------------------------------------------------------------


def _version_context(user: User, version: PolicyVersion) -> dict[str, Any]:
    abilities = selectors.policy_abilities(user)
    status = version.status
    authored = version.authored_by(user)
    return {
        "version": version,
        "policy": version.policy,
        "rules": selectors.version_rules(version),
        "history": selectors.policy_version_history(version),
        "abilities": abilities,
        "authored": authored,
        "can_submit": abilities.edit and status == PolicyStatus.DRAFT,
        # Four eyes (policies.services): its author neither reviews nor activates a version,
        # so the page offers them neither.
        "can_review": abilities.review and status == PolicyStatus.SUBMITTED and not authored,
        "can_activate": abilities.review and status == PolicyStatus.APPROVED and not authored,
        "can_rollback": abilities.review and status == PolicyStatus.RETIRED and not authored,
        # ... and is told who acts next instead.
        "waits_for_another": authored
        and abilities.review
        and status in (PolicyStatus.SUBMITTED, PolicyStatus.APPROVED, PolicyStatus.RETIRED),
        "active_id": version.policy.active_version_id,
        "changes_from_active": _changes_from_active(user, version),
    }


def _changes_from_active(user: User, version: PolicyVersion) -> list[str] | None:
    """What this version changes from the one in force, in words; None for the active one (or
    when none is active)."""
    active_id = version.policy.active_version_id
    if active_id is None or active_id == version.pk:
        return None
    _, _, diff = selectors.policy_version_diff_for_user(user, active_id, version.pk)
    return list(diff.changes)


@require_GET
@policy_page
def version_detail(request: HttpRequest, version_id: int) -> HttpResponse:
    version = selectors.policy_version_get_for_user(_user(request), version_id)
    return render(
        request, "console/policies/version_detail.html", _version_context(_user(request), version)
    )


ACTIONS = ("submit", "approve", "reject", "activate", "rollback")


@require_POST
@policy_page
def version_action(request: HttpRequest, version_id: int, action: str) -> HttpResponse:
    """Submit, approve, reject (with a note), activate or roll back (with a reason); a refusal
    (four eyes, a wrong state, a missing reason) re-renders the page with what went wrong."""
    user = _user(request)
    if action not in ACTIONS:
        raise Http404(f"no action {action}")
    note = request.POST.get("note", "").strip()
    try:
        if action == "submit":
            selectors.policy_edit_check(user)
            services.policy_submit(version_id=version_id, user=user)
            done = "Submitted for review: another policy admin approves or rejects it."
        elif action in ("approve", "reject"):
            selectors.policy_review_check(user)
            services.policy_review(
                version_id=version_id, user=user, approve=action == "approve", note=note
            )
            done = "Approved: it can now be activated." if action == "approve" else "Rejected."
        elif action == "activate":
            selectors.policy_review_check(user)
            services.policy_activate(version_id=version_id, user=user, note=note)
            done = "Activated: the engine enforces this version from now on."
        else:
            selectors.policy_review_check(user)
            services.policy_rollback(version_id=version_id, user=user, reason=note)
            done = "Rolled back: this version is in force again."
    except (PolicyError, PolicySourceError) as exc:
        if isinstance(exc, PolicyDenied) and exc.code in ROLE_REFUSALS:
            # Not a policy admin at all: the page to show is the 403 one, not the version's.
            return _forbidden(request, exc.message)
        version = selectors.policy_version_get_for_user(user, version_id)
        context = _version_context(user, version)
        context["refusal"] = str(exc) if isinstance(exc, PolicySourceError) else exc.message
        context["refused_action"] = action
        return render(
            request, "console/policies/version_detail.html", context, status=_refusal_status(exc)
        )
    messages.success(request, done)
    return redirect("console:policy_version", version_id=version_id)


def _refusal_status(exc: PolicyError | PolicySourceError) -> int:
    if isinstance(exc, PolicySourceError) or exc.code == Code.REASON_REQUIRED:
        return 422
    return next((status for cls, status in REFUSAL_STATUS.items() if isinstance(exc, cls)), 400)


# --- the editor -------------------------------------------------------------------------------


def _lines(source: str, problems: list[SourceProblem]) -> list[dict[str, Any]]:
    by_line: dict[int, list[SourceProblem]] = {}
    for problem in problems:
        by_line.setdefault(problem.line, []).append(problem)
    lines = source.split("\n") or [""]
    return [
        {"number": n, "text": text, "problems": by_line.get(n, [])}
        for n, text in enumerate(lines, start=1)
    ]


def _problems(source: str) -> tuple[PolicyDocument | None, list[SourceProblem]]:
    try:
        return policy_source_parse(source), []
    except PolicySourceError as exc:
        return None, exc.problems


def _items(document: PolicyDocument | None) -> dict[str, list[dict[str, str]]]:
    """What the document holds, per section, as identity + one line, for the editor's lists."""
    if document is None:
        return {}
    summaries = {rule.id: rule_summary(rule) for rule in document.rules}
    found: dict[str, list[dict[str, str]]] = {}
    for section in ITEM_FORMS:
        found[section] = [
            {
                "identity": identity,
                "summary": summaries.get(identity, "") if section == "rules" else "",
            }
            for identity in item_identities(document, section)
        ]
    return found


def _forms(
    bound: ItemForm | None = None, initial: tuple[str, dict[str, Any]] | None = None
) -> list[ItemForm]:
    forms = []
    for section, form_class in ITEM_FORMS.items():
        if bound is not None and bound.section == section:
            forms.append(bound)
        elif initial is not None and initial[0] == section:
            forms.append(form_class(prefix=section, initial=initial[1]))
        else:
            forms.append(form_class(prefix=section))
    return forms


def _editor(
    request: HttpRequest,
    name: str,
    source: str,
    *,
    note: str = "",
    status: int = 200,
    started_from: PolicyVersion | None = None,
    checked: bool = False,
    bound: ItemForm | None = None,
    initial: tuple[str, dict[str, Any]] | None = None,
    notice: str = "",
    form_problems: list[str] | None = None,
) -> HttpResponse:
    document, problems = _problems(source)
    items = _items(document)
    forms = _forms(bound, initial)
    for form in forms:
        form.existing = items.get(form.section, [])  # type: ignore[attr-defined]  # for the template only, not a form field
    return render(
        request,
        "console/policies/editor.html",
        {
            "name": name,
            "source": source,
            "note": note,
            "problems": problems,
            "checked": checked,
            "lines": _lines(source, problems) if problems else [],
            "problem_lines": " ".join(str(line) for line in sorted({p.line for p in problems})),
            "forms": forms,
            "started_from": started_from,
            "notice": notice,
            "form_problems": form_problems or [],
            "open_section": (
                bound.section if bound is not None else initial[0] if initial is not None else ""
            ),
        },
        status=status,
    )


@require_http_methods(["GET", "POST"])
@policy_page
def policy_edit(request: HttpRequest, name: str) -> HttpResponse:
    """The editor for a new draft of ``name``: GET starts from a version (``?from=<id>``, else
    the active one); POST checks, saves, or applies one of the forms to the YAML."""
    user = _user(request)
    selectors.policy_edit_check(user)
    if request.method == "GET":
        started_from = None
        from_id = _int(request.GET.get("from"))
        if from_id is not None:
            started_from = selectors.policy_version_get_for_user(user, from_id)
        else:
            try:
                policy = selectors.policy_get_for_user(user, name)
            except PolicyNotFound:
                policy = None  # a new policy: its first draft starts from an empty document
            if policy is not None and policy.active_version_id is not None:
                started_from = selectors.policy_version_get_for_user(user, policy.active_version_id)
        source = started_from.source if started_from is not None else "default: deny\nrules: []\n"
        return _editor(request, name, source, started_from=started_from)

    source = request.POST.get("source", "").replace("\r\n", "\n")
    note = request.POST.get("note", "")
    intent = request.POST.get("intent", "check")
    if intent == "save":
        try:
            version = services.policy_draft(source=source, author=user, note=note, policy_name=name)
        except PolicySourceError:
            return _editor(
                request,
                name,
                source,
                note=note,
                checked=True,
                status=422,
                notice="The draft was not saved: fix the problems below first.",
            )
        messages.success(
            request, f"Draft v{version.number} saved. Simulate it, then submit it for review."
        )
        return redirect("console:policy_version", version_id=version.pk)
    if intent.startswith("load:"):
        _, section, identity = [*intent.split(":", 2), "", ""][:3]
        document, _ = _problems(source)
        form_class = ITEM_FORMS.get(section)
        item = (
            document_item(document, section, identity)
            if document is not None and form_class
            else None
        )
        initial = (
            form_class.initial_from(identity, item)
            if form_class is not None and item is not None
            else None
        )
        if form_class is None or initial is None:
            return _editor(
                request,
                name,
                source,
                note=note,
                notice=f"{identity} cannot be edited with a form: edit it in the YAML.",
            )
        return _editor(request, name, source, note=note, initial=(section, initial))
    if intent.startswith("apply:"):
        form_class = ITEM_FORMS.get(intent.removeprefix("apply:"))
        if form_class is None:
            return _editor(request, name, source, note=note, status=400, notice="Unknown form.")
        form = form_class(request.POST, prefix=form_class.section)
        document, problems = _problems(source)
        if document is None:
            return _editor(
                request,
                name,
                source,
                note=note,
                checked=True,
                status=422,
                bound=form,
                notice="Fix the problems in the YAML before using a form.",
            )
        if not form.is_valid():
            return _editor(request, name, source, note=note, status=422, bound=form)
        try:
            edited = document_upsert(document, form.section, form.to_item(), name=form.identity())
        except DocumentEditError as exc:
            return _editor(
                request, name, source, note=note, status=422, bound=form, form_problems=exc.problems
            )
        return _editor(
            request,
            name,
            policy_source_render(edited),
            note=note,
            notice=f"{form.title} {form.identity()} applied to the YAML below (not saved yet; "
            "the YAML is rewritten in its canonical form, without comments).",
        )
    _, problems = _problems(source)
    return _editor(
        request,
        name,
        source,
        note=note,
        checked=True,
        status=422 if problems else 200,
        notice="" if problems else "No problems: the document is valid.",
    )


# --- diff and simulation ----------------------------------------------------------------------


@require_GET
@policy_page
def policy_diff(request: HttpRequest, name: str) -> HttpResponse:
    user = _user(request)
    policy = selectors.policy_get_for_user(user, name)
    choices = list(selectors.policy_versions_for_choice(policy))
    from_id, to_id = _int(request.GET.get("from")), _int(request.GET.get("to"))
    if from_id is None and to_id is None and choices:
        to_id = choices[0].pk
        from_id = (
            policy.active_version_id
            if policy.active_version_id != to_id
            else (choices[1].pk if len(choices) > 1 else to_id)
        )
    context: dict[str, Any] = {
        "policy": policy,
        "choices": choices,
        "from_id": from_id,
        "to_id": to_id,
    }
    if from_id is not None and to_id is not None:
        old, new, diff = selectors.policy_version_diff_for_user(user, from_id, to_id)
        context.update(old=old, new=new, diff=diff, unified_lines=diff.unified.splitlines())
    return render(request, "console/policies/diff.html", context)


@require_GET
@policy_page
def version_simulate(request: HttpRequest, version_id: int) -> HttpResponse:
    user = _user(request)
    days = _int(request.GET.get("days")) or 7
    result = selectors.policy_simulation_for_user(user, version_id, days=days, examples=5)
    simulation = result.simulation
    outcomes = sorted(set(simulation.current_outcomes) | set(simulation.draft_outcomes))
    return render(
        request,
        "console/policies/simulate.html",
        {
            "result": result,
            "version": result.version,
            "policy": result.version.policy,
            "simulation": simulation,
            "days": days,
            "sentences": simulation.sentences(),
            "outcomes": [
                {
                    "name": name,
                    "current": simulation.current_outcomes.get(name, 0),
                    "draft": simulation.draft_outcomes.get(name, 0),
                }
                for name in outcomes
            ],
            "changes": [
                {
                    "change": change,
                    "sentence": change.sentence(),
                    # Counters are dicts: a template's ``.most_common`` would look up a key, so list them here.
                    "by_action": change.by_action.most_common(),
                    "by_rule": change.by_rule.most_common(),
                    "examples": [
                        {"example": example, "run_id": result.runs.get(example.record.id or 0)}
                        for example in change.examples
                    ],
                }
                for change in simulation.changes
            ],
            "version_url": reverse("console:policy_version", args=[result.version.pk]),
        },
    )
