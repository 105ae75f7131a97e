"""Reads of runs, with authorization built in so the API, the pages and websockets agree.

Who may do what (django-guardian; a permission held globally counts for every object):

* **see** a run: ``orchestration.view_run`` (every run), or ``policies.view_runs`` on its tenant,
  or ``orchestration.view_run`` on the run itself, or having submitted it;
* **submit**: ``orchestration.add_run`` and ``policies.submit_runs`` on the tenant;
* **decide** for a run (approvals, escalations, cancelling, sending events):
  ``orchestration.decide_run`` (or on the run), ``policies.decide_runs`` on its tenant and
  ``orchestration.decide_workflow`` on its workflow; for an approval or escalation, a tier at
  least the one it needs (``orchestration.decide_tier_1`` .. ``_3``; a higher tier includes the
  lower ones), and never an approval of a run one submitted oneself.

Every permission check of the API, the pages and the websockets is a function here:
``*_for_user`` reads return only what the user may see (NotFound otherwise), ``*_for_decision``
reads also refuse a user who may see but not decide (PermissionDenied, recorded in the audit
log), ``*_check`` functions refuse an action outright.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.db.models import (
    Case,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    Q,
    QuerySet,
    Value,
    When,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce, Least
from guardian.models import GroupObjectPermission, UserObjectPermission
from guardian.shortcuts import get_objects_for_user

from audit.selectors import audit_first_events, latest_audit_event_id
from audit.services import Entry, audit_record_alone
from audit.verbs import ActorType, Verb
from orchestration import runtime
from orchestration.errors import Code, InvalidInput, NotFound, PermissionDenied
from orchestration.models import (
    DRILL_WORKFLOW,
    Run,
    RunEvent,
    StateVersion,
    Step,
    StepStatus,
    ToolCall,
    Wait,
    WaitClaim,
    WaitKind,
    WaitStatus,
    WorkflowRecord,
)
from orchestration.tools.status import capability_status_list
from policies.models import PolicyDecision, ScopeKind, SpendScope, Tenant

VIEW = "orchestration.view_run"
DECIDE = "orchestration.decide_run"
SUBMIT = "orchestration.add_run"
VIEW_FOR_TENANT = "policies.view_runs"
SUBMIT_FOR_TENANT = "policies.submit_runs"
DECIDE_FOR_TENANT = "policies.decide_runs"
DECIDE_WORKFLOW = "orchestration.decide_workflow"
#: The permission of each approval tier; holding a higher one includes the lower ones.
TIERS = {
    1: "orchestration.decide_tier_1",
    2: "orchestration.decide_tier_2",
    3: "orchestration.decide_tier_3",
}


def user_tier(user: User) -> int:
    """The highest approval tier ``user`` holds (0: none)."""
    if not user.is_authenticated or not user.is_active:
        return 0
    return max((tier for tier, perm in TIERS.items() if user.has_perm(perm)), default=0)


def sees_every_run(user: User) -> bool:
    """Whether ``user`` may see every run (the run permission, or every tenant's), from their
    permissions alone."""
    return user.has_perm(VIEW) or user.has_perm(VIEW_FOR_TENANT)


def tenants_visible_to(user: User) -> QuerySet[Tenant]:
    """Tenants whose runs ``user`` may see."""
    if not user.is_authenticated:
        return Tenant.objects.none()
    if sees_every_run(user):
        return Tenant.objects.all()
    return get_objects_for_user(user, VIEW_FOR_TENANT, klass=Tenant, accept_global_perms=False)


def runs_visible_to(user: User) -> QuerySet[Run]:
    if not user.is_authenticated:
        return Run.objects.none()
    if sees_every_run(user):
        return Run.objects.all()
    tenants = get_objects_for_user(user, VIEW_FOR_TENANT, klass=Tenant, accept_global_perms=False)
    granted = get_objects_for_user(
        user, VIEW, klass=Run, accept_global_perms=False, with_superuser=False
    )
    return Run.objects.filter(
        Q(tenant__in=tenants.values("pk")) | Q(pk__in=granted.values("pk")) | Q(submitted_by=user)
    )


@dataclass(frozen=True)
class RunScope:
    """Which runs a user may see, read once (:func:`run_scope`): every run, or the runs of some
    tenants, the runs granted to the user one by one and the runs they submitted. The same runs
    as :func:`runs_visible_to`, held as values, so that waits and steps are narrowed by them
    directly rather than by a subquery that reads every run of the user's tenants."""

    every: bool = False
    tenant_ids: frozenset[int] = frozenset()
    run_ids: frozenset[int] = frozenset()
    #: The user, for the runs they submitted (None: anonymous).
    submitter_id: int | None = None

    def runs(self) -> Q:
        """The visible runs, as a filter of runs."""
        if self.every:
            return Q()
        return self._any(
            Q(tenant_id__in=self.tenant_ids),
            Q(pk__in=self.run_ids),
            Q(submitted_by_id=self.submitter_id),
        )

    def runs_apart(self) -> list[Q]:
        """The visible runs as filters no run matches more than one of: the tenants' runs, and
        the other runs granted or submitted. Counted apart, each is one index scan (index-only,
        by tenant and status, for the tenants); counted with their ``OR``, every run is read."""
        if self.every or not self.tenant_ids:
            return [self.runs()]
        tenants = Q(tenant_id__in=self.tenant_ids)
        others = RunScope(run_ids=self.run_ids, submitter_id=self.submitter_id).runs()
        return [tenants, others & ~tenants]

    def waits(self) -> Q:
        """Waits of the visible runs (by their own tenant: no join of the runs)."""
        if self.every:
            return Q()
        return self._any(
            Q(tenant_id__in=self.tenant_ids),
            Q(run_id__in=self.run_ids),
            # A subquery, not a join: only the runs this user submitted are read.
            Q(run_id__in=Run.objects.filter(submitted_by_id=self.submitter_id).values("pk")),
        )

    def steps(self) -> Q:
        """Steps of the visible runs, through their run (a step has no tenant of its own; for
        the few queued or running steps home counts, a join by primary key)."""
        if self.every:
            return Q()
        return self._any(
            Q(run__tenant_id__in=self.tenant_ids),
            Q(run_id__in=self.run_ids),
            Q(run__submitted_by_id=self.submitter_id),
        )

    def _any(self, tenants: Q, granted: Q, submitted: Q) -> Q:
        parts = [
            part
            for part, present in (
                (tenants, bool(self.tenant_ids)),
                (granted, bool(self.run_ids)),
                (submitted, self.submitter_id is not None),
            )
            if present
        ]
        if not parts:
            return Q(pk__in=[])  # nothing (Django answers it without a query)
        combined = parts[0]
        for part in parts[1:]:
            combined |= part
        return combined


EVERY_RUN = RunScope(every=True)
NO_RUN = RunScope()


def run_scope(user: User) -> RunScope:
    """The runs ``user`` may see (:func:`runs_visible_to`) as a :class:`RunScope`: at most one
    query, for the user's object permissions (their own and their groups'), once their model
    permissions are loaded."""
    if not user.is_authenticated:
        return NO_RUN
    # guardian gives a superuser every tenant, even an inactive one (whose has_perm is False),
    # and every run has a tenant.
    if sees_every_run(user) or user.is_superuser:
        return EVERY_RUN
    tenant_ids: set[int] = set()
    run_ids: set[int] = set()
    for_tenant = VIEW_FOR_TENANT.partition(".")[2]
    for codename, object_pk in _view_grants(user):
        pk = _object_pk(object_pk)
        if pk is not None:
            (tenant_ids if codename == for_tenant else run_ids).add(pk)
    return RunScope(
        tenant_ids=frozenset(tenant_ids), run_ids=frozenset(run_ids), submitter_id=user.pk
    )


def _view_grants(user: User) -> list[tuple[str, str]]:
    """(codename, object pk) of every object permission ``user`` holds, directly or through a
    group, to see a tenant's runs or one run: one query."""
    wanted = [
        value
        for perm, model in ((VIEW_FOR_TENANT, Tenant), (VIEW, Run))
        for value in (perm.partition(".")[0], model._meta.model_name, perm.partition(".")[2])
    ]
    with connection.cursor() as cursor:
        cursor.execute(_view_grants_sql(), [user.pk, *wanted, user.pk, *wanted])
        return [(codename, object_pk) for codename, object_pk in cursor.fetchall()]


@cache
def _view_grants_sql() -> str:
    """:func:`_view_grants`' statement, written out once: built by the ORM (a union of two
    three-way joins), the call took 3 to 4 ms on every page of a tenant-scoped user, written out
    under 1 ms (PostgreSQL runs it in 0.1 ms)."""
    permission, content_type = Permission._meta.db_table, ContentType._meta.db_table
    wanted = (
        "((c.app_label = %s AND c.model = %s AND p.codename = %s)"
        " OR (c.app_label = %s AND c.model = %s AND p.codename = %s))"
    )
    granted = (
        f" JOIN {permission} p ON p.id = o.permission_id"
        f" JOIN {content_type} c ON c.id = p.content_type_id"
    )
    return (
        f"SELECT p.codename, o.object_pk FROM {UserObjectPermission._meta.db_table} o{granted}"
        f" WHERE o.user_id = %s AND {wanted}"
        f" UNION ALL SELECT p.codename, o.object_pk FROM {GroupObjectPermission._meta.db_table} o"
        f" JOIN {User.groups.through._meta.db_table} m ON m.group_id = o.group_id{granted}"
        f" WHERE m.user_id = %s AND {wanted}"
    )


def _object_pk(text: str) -> int | None:
    """guardian's object pk (text) as a run's or tenant's id; None for text guardian would not
    match to one (it compares the id written as text)."""
    return int(text) if text.isdigit() and str(int(text)) == text else None


def visibility_key(user: User) -> str:
    """The same for users who see the same runs (a key under which what one of them is shown
    may be shown to the others): everyone who sees every run, or this user alone."""
    if user.is_authenticated and sees_every_run(user):
        return "every-run"
    return f"user-{user.pk}"


def _refused(
    user: User, what: str, code: str, *, run: Run | None = None, **detail: Any
) -> PermissionDenied:
    """A refusal: recorded in the audit log (who was refused what), and raised by the caller."""
    audit_record_alone(
        Entry(
            verb=Verb.ACCESS_DENIED,
            object_type="run" if run is not None else "user",
            object_id=run.pk if run is not None else user.pk,
            actor_type=ActorType.HUMAN,
            actor_id=user.get_username(),
            run_id=run.pk if run is not None else None,
            trace_id=run.trace_id if run is not None else "",
            data={"code": str(code), "what": what, **detail},
        )
    )
    return PermissionDenied(what, code=code, detail=detail or None)


def run_get_for_user(user: User, run_id: int) -> Run:
    """The run, or NotFound — also when it exists but the user may not see it."""
    run = runs_visible_to(user).filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"no run {run_id}", code=Code.RUN_NOT_FOUND)
    return run


def run_visible(user: User, run: Run) -> bool:
    """Whether ``user`` may see ``run`` (read already): the runs of :func:`runs_visible_to`,
    without a query unless the user's grants are per tenant or per run."""
    if not user.is_authenticated:
        return False
    if sees_every_run(user):
        return True
    if run.submitted_by_id is not None and run.submitted_by_id == user.pk:
        return True
    return run_is_visible(user, run.pk)


def run_is_visible(user: User, run_id: int) -> bool:
    """Whether ``user`` may see the run (a websocket's check before it joins the run's group)."""
    return runs_visible_to(user).filter(pk=run_id).exists()


def may_decide(user: User, run: Run) -> bool:
    """Whether ``user`` may decide for ``run``: the deciding permission, on its tenant and on
    its workflow (tiers and self-approval are the wait's: :func:`wait_check_decide`)."""
    if not user.is_authenticated or not user.is_active:
        return False
    if not (user.has_perm(DECIDE) or user.has_perm(DECIDE, run)):
        return False
    tenant = Tenant(pk=run.tenant_id)
    if not (user.has_perm(DECIDE_FOR_TENANT) or user.has_perm(DECIDE_FOR_TENANT, tenant)):
        return False
    if user.has_perm(DECIDE_WORKFLOW):
        return True
    record = WorkflowRecord.objects.filter(name=run.workflow_name).first()
    return record is not None and user.has_perm(DECIDE_WORKFLOW, record)


def run_check_decide(user: User, run: Run) -> None:
    """PermissionDenied (audited) unless ``user`` may decide for ``run``."""
    if not may_decide(user, run):
        raise _refused(
            user,
            "you may not decide approvals or escalations, cancel, or send events for this run",
            Code.DECIDE_DENIED,
            run=run,
        )


def wait_ceiling_hit(wait: Wait) -> dict[str, Any] | None:
    """The ceiling an escalation stopped at (``CeilingExceeded``'s detail: the scope's kind
    and key, its limit, spent and reserved, and the call's amount, as strings), or None when it
    did not stop at a cost ceiling."""
    error = (wait.action or {}).get("error") if wait.kind == WaitKind.ESCALATION else None
    if not isinstance(error, dict) or error.get("code") != Code.CEILING_EXCEEDED:
        return None
    detail = error.get("detail")
    return detail if isinstance(detail, dict) else {}


def _stopped_at_ceiling(wait: Wait) -> bool:
    return wait_ceiling_hit(wait) is not None


def wait_refusal(user: User, wait: Wait) -> tuple[str, str, dict[str, Any]] | None:
    """Why ``user`` may not decide ``wait`` (message, code, detail), or None if they may: the
    run's deciding permissions, a high enough tier, and for an approval not one's own run."""
    run = wait.run
    if not may_decide(user, run):
        return "you may not decide approvals or escalations of this run", Code.DECIDE_DENIED, {}
    held = user_tier(user)
    if held < wait.tier:
        why = (
            " (it stopped at a cost ceiling: only someone who may raise the ceiling decides it)"
            if _stopped_at_ceiling(wait)
            else ""
        )
        return (
            f"this {wait.kind} needs tier {wait.tier}; you hold tier {held}{why}. Someone with tier "
            f"{wait.tier} or above on this tenant and workflow can decide it",
            Code.TIER_TOO_LOW,
            {"required_tier": wait.tier, "your_tier": held},
        )
    if (
        wait.kind == WaitKind.APPROVAL
        and run.submitted_by_id is not None
        and run.submitted_by_id == user.pk
    ):
        return "you submitted this run: someone else must approve it", Code.SELF_APPROVAL, {}
    return None


def wait_check_decide(user: User, wait: Wait) -> None:
    """PermissionDenied (audited) unless ``user`` may decide ``wait`` (see :func:`wait_refusal`)."""
    refusal = wait_refusal(user, wait)
    if refusal is not None:
        message, code, detail = refusal
        raise _refused(user, message, code, run=wait.run, wait=wait.pk, **detail)


def run_get_for_decision(user: User, run_id: int) -> Run:
    """The run, if ``user`` may cancel it or send it events: NotFound if they may not see it,
    PermissionDenied if they may see but not decide."""
    run = run_get_for_user(user, run_id)
    run_check_decide(user, run)
    return run


def submit_check(user: User, tenant: Tenant | None = None) -> None:
    """PermissionDenied (audited) unless ``user`` may submit runs (for ``tenant``, if given)."""
    if not user.has_perm(SUBMIT):
        raise _refused(user, "you may not submit runs", Code.SUBMIT_DENIED)
    if tenant is not None and not (
        user.has_perm(SUBMIT_FOR_TENANT) or user.has_perm(SUBMIT_FOR_TENANT, tenant)
    ):
        raise _refused(
            user,
            f"you may not submit runs for tenant {tenant.slug!r}",
            Code.TENANT_DENIED,
            tenant=tenant.slug,
        )


def capability_status_list_for_user(user: User) -> list[dict[str, Any]]:
    """The tool registry's live state (capabilities, providers, health, limits, circuits) for
    those who may view every run; PermissionDenied for anyone else."""
    if not user.has_perm(VIEW):
        raise PermissionDenied("you may not see the tool registry", code=Code.VIEW_DENIED)
    return capability_status_list()


@dataclass
class RunPage:
    items: list[Run]
    next_cursor: str | None


def run_list_for_user(
    user: User,
    *,
    status: list[str] | None = None,
    waiting_for: str | None = None,
    workflow: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> RunPage:
    """Newest first, keyset-paginated on (created_at, id): stable while new runs arrive.
    ``waiting_for``: only runs with an open wait of that kind (a ``WaitKind``)."""
    qs = runs_visible_to(user)
    if status:
        qs = qs.filter(status__in=status)
    if waiting_for:
        qs = qs.filter(
            pk__in=Wait.objects.filter(status=WaitStatus.OPEN, kind=waiting_for).values("run_id")
        )
    if workflow:
        qs = qs.filter(workflow_name=workflow)
    if created_after:
        qs = qs.filter(created_at__gte=created_after)
    if created_before:
        qs = qs.filter(created_at__lt=created_before)
    if cursor:
        at, pk = decode_cursor(cursor)
        qs = qs.filter(Q(created_at__lt=at) | Q(created_at=at, pk__lt=pk))
    rows = list(qs.order_by("-created_at", "-id")[: limit + 1])
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return RunPage(items=rows[:limit], next_cursor=next_cursor)


def encode_cursor(run: Run) -> str:
    """URL-safe: microseconds since the epoch (UTC) and the id, e.g. ``1795424400123456-42``."""
    micros = int(run.created_at.timestamp()) * 1_000_000 + run.created_at.microsecond
    return f"{micros}-{run.pk}"


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        micros, _, pk = cursor.partition("-")
        seconds, fraction = divmod(int(micros), 1_000_000)
        at = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=fraction)
        return at, int(pk)
    except (ValueError, OverflowError, OSError):
        raise InvalidInput(
            "cursor is not valid; use next_cursor from the previous page", code=Code.INVALID_CURSOR
        ) from None


def run_steps(run: Run) -> list[Step]:
    return list(Step.objects.filter(run=run).order_by("id"))


def run_state_history(run: Run) -> list[StateVersion]:
    return list(StateVersion.objects.filter(run=run).order_by("id"))


def run_waits(run: Run) -> list[Wait]:
    return list(Wait.objects.filter(run=run).select_related("decided_by").order_by("id"))


def run_events(run: Run) -> list[RunEvent]:
    return list(RunEvent.objects.filter(run=run).order_by("id"))


def approvals_pending_for_user(user: User, *, limit: int = 100) -> list[Wait]:
    """Open approvals on runs the user may see, oldest deadline first."""
    return list(
        Wait.objects.filter(
            kind=WaitKind.APPROVAL, status=WaitStatus.OPEN, run__in=runs_visible_to(user)
        )
        .select_related("run", "step")
        .order_by("deadline_at", "id")[:limit]
    )


def approval_get_for_user(user: User, wait_id: int) -> Wait:
    """The approval with its run and step, or NotFound — also when the user may not see its run.
    Read by id first (one prepared statement on PostgreSQL), the run's visibility checked then:
    from the user's permissions alone when they see every run, as operators usually do."""
    wait = runtime.current().store.wait_with_run(wait_id, WaitKind.APPROVAL)
    if wait is None or not run_visible(user, wait.run):
        raise NotFound(f"no approval {wait_id}", code=Code.APPROVAL_NOT_FOUND)
    return wait


def approvals_visible_to(user: User, wait_ids: list[int]) -> dict[int, Wait]:
    """Those of ``wait_ids`` that are approvals on runs ``user`` may see, by id, with their run
    and step (one query)."""
    rows = Wait.objects.filter(
        pk__in=wait_ids, kind=WaitKind.APPROVAL, run__in=runs_visible_to(user)
    )
    return {wait.pk: wait for wait in rows.select_related("run", "step")}


def approval_get_for_decision(user: User, wait_id: int) -> Wait:
    """The approval (with its run), if ``user`` may decide it: NotFound if they may not see its
    run, PermissionDenied if they may see but not decide."""
    wait = approval_get_for_user(user, wait_id)
    wait_check_decide(user, wait)
    return wait


# --- escalations --------------------------------------------------------------------------------

#: ``?status=`` values of the escalation list and the wait statuses each one matches.
ESCALATION_STATUS_FILTERS: dict[str, tuple[str, ...]] = {
    "open": (WaitStatus.OPEN,),
    "resolved": (WaitStatus.RESOLVED,),
    "expired": (WaitStatus.EXPIRED,),
    "cancelled": (WaitStatus.CANCELLED,),
    "all": (),
}


@dataclass
class WaitPage:
    items: list[Wait]
    next_cursor: str | None


def _escalations_visible_to(user: User) -> QuerySet[Wait]:
    qs = Wait.objects.filter(kind=WaitKind.ESCALATION)
    if user.is_authenticated and sees_every_run(user):
        return qs  # every run: no need to join the run list
    return qs.filter(run__in=runs_visible_to(user))


def escalations_for_user(
    user: User,
    *,
    status: str = "open",
    workflow: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
) -> WaitPage:
    """Escalations on runs the user may see, newest first, keyset-paginated on the id (ids
    only grow, so a page is stable while new escalations arrive)."""
    qs = _escalations_visible_to(user)
    statuses = ESCALATION_STATUS_FILTERS[status]
    if statuses:
        qs = qs.filter(status__in=statuses)
    if workflow:
        qs = qs.filter(run__workflow_name=workflow)
    if cursor:
        qs = qs.filter(pk__lt=decode_id_cursor(cursor))
    rows = list(qs.select_related("run", "step", "decided_by").order_by("-id")[: limit + 1])
    next_cursor = encode_id_cursor(rows[limit - 1].pk) if len(rows) > limit else None
    return WaitPage(items=rows[:limit], next_cursor=next_cursor)


def escalation_get_for_user(user: User, wait_id: int) -> Wait:
    """The escalation, or NotFound — also when its run is not visible to the user."""
    wait = (
        _escalations_visible_to(user)
        .filter(pk=wait_id)
        .select_related("run", "step", "decided_by")
        .first()
    )
    if wait is None:
        raise NotFound(f"no escalation {wait_id}", code=Code.ESCALATION_NOT_FOUND)
    return wait


def escalation_get_for_resolve(user: User, wait_id: int) -> Wait:
    """The escalation, if ``user`` may answer it: NotFound if they may not see its run,
    PermissionDenied if they may see but not decide."""
    wait = escalation_get_for_user(user, wait_id)
    wait_check_decide(user, wait)
    return wait


def encode_id_cursor(pk: int) -> str:
    return str(pk)


def decode_id_cursor(cursor: str) -> int:
    if not (cursor.isascii() and cursor.isdigit()) or not 0 < int(cursor) < 2**63:
        raise InvalidInput(
            "cursor is not valid; use next_cursor from the previous page", code=Code.INVALID_CURSOR
        )
    return int(cursor)


def step_summary(step: Step) -> dict[str, Any]:
    return {"id": step.pk, "key": step.key, "status": step.status}


# --- escalation drills ------------------------------------------------------------------------------


@dataclass
class DrillRow:
    run: Run
    tier: int
    tenant: str
    fired_at: datetime
    #: The drill's escalation (none until the engine has run its step).
    wait: Wait | None
    acknowledged_by: str
    #: Seconds from the escalation opening to its first claim or answer (none until then).
    seconds_to_acknowledge: float | None
    #: How it was acknowledged: ``claim``, or the answer (``retry``, ``skip``, ``abort``).
    acknowledged_how: str = ""


#: Who may fire escalation drills and see them: policy admins.
FIRE_DRILL = "policies.review_policy"


def drill_fire_check(user: User) -> None:
    """PermissionDenied (audited) unless ``user`` may fire escalation drills."""
    if not user.has_perm(FIRE_DRILL):
        raise _refused(
            user, "only policy admins may fire escalation drills", Code.PERMISSION_DENIED
        )


def drill_list_for_user(user: User, *, limit: int = 50) -> list[DrillRow]:
    """Past drills, newest first, with how long each took to be acknowledged (claimed or
    answered, whichever came first: its DRILL_ACKNOWLEDGED event). For policy admins (who fire
    them); three queries whatever the number of drills."""
    if not user.has_perm(FIRE_DRILL):
        raise PermissionDenied(
            "only policy admins may see escalation drills", code=Code.PERMISSION_DENIED
        )
    runs = list(
        Run.objects.filter(workflow_name=DRILL_WORKFLOW)
        .select_related("tenant")
        .order_by("-id")[:limit]
    )
    waits: dict[int, Wait] = {}
    for escalation in Wait.objects.filter(run__in=runs, kind=WaitKind.ESCALATION).order_by("id"):
        waits.setdefault(escalation.run_id, escalation)
    acks = audit_first_events(Verb.DRILL_ACKNOWLEDGED, "wait", [str(w.pk) for w in waits.values()])
    rows = []
    for run in runs:
        wait = waits.get(run.pk)
        ack = acks.get(str(wait.pk)) if wait is not None else None
        by, data = (ack.actor_id, ack.data or {}) if ack is not None else ("", {})
        seconds = data.get("seconds")
        rows.append(
            DrillRow(
                run=run,
                tier=run.drill_tier,
                tenant=run.tenant.slug,
                fired_at=run.created_at,
                wait=wait,
                acknowledged_by=by,
                seconds_to_acknowledge=round(float(seconds), 1) if seconds is not None else None,
                acknowledged_how=str(data.get("how", "")),
            )
        )
    return rows


# --- home and the decision inbox ---------------------------------------------------------------------

#: Escalation reasons as the home page groups them (``Wait.action["why"]`` starts with one of
#: these words; anything else is "other").
ESCALATION_REASONS = (
    ("retries exhausted", "retries exhausted"),
    ("contract violation", "contract violation"),
    ("ceiling hit", "limit reached"),
    ("policy", "policy"),
)


def _escalation_reason(why: str) -> str:
    for label, prefix in ESCALATION_REASONS:
        if (why or "").startswith(prefix):
            return label
    return "other"


@dataclass
class HomeFilters:
    """The home page's filters, as GET parameters (so a link reproduces the view)."""

    workflow: str = ""
    tenant: str = ""
    status: str = ""
    agent: str = ""
    #: Only runs created within this many hours (0: any age).
    age_hours: int = 0
    #: Only runs with an open decision that needs this tier (0: any).
    tier: int = 0

    @property
    def narrows_runs(self) -> bool:
        """Whether a filter other than the status narrows the runs counted."""
        return bool(self.workflow or self.tenant or self.agent or self.age_hours or self.tier)


def _home_runs(scope: RunScope, filters: HomeFilters) -> QuerySet[Run]:
    return _home_filtered(filters).filter(scope.runs())


def _home_filtered(filters: HomeFilters) -> QuerySet[Run]:
    qs = Run.objects.all()
    if filters.workflow:
        qs = qs.filter(workflow_name=filters.workflow)
    if filters.tenant:
        qs = qs.filter(tenant__slug=filters.tenant)
    if filters.agent:
        qs = qs.filter(pk__in=Step.objects.filter(agent=filters.agent).values("run_id"))
    if filters.age_hours:
        qs = qs.filter(created_at__gte=datetime.now(tz=UTC) - timedelta(hours=filters.age_hours))
    if filters.tier:
        qs = qs.filter(
            pk__in=Wait.objects.filter(status=WaitStatus.OPEN, tier=filters.tier).values("run_id")
        )
    return qs


def _of_runs(
    rows: QuerySet[Any], runs: QuerySet[Run], filters: HomeFilters, visible: Q
) -> QuerySet[Any]:
    """``rows`` of the runs in ``runs``. When no filter narrows them, ``visible`` (the user's
    :class:`RunScope` for these rows) says which without reading the runs: nothing for a user
    who sees every run, their tenants' rows, granted runs and own runs for anyone else."""
    if not filters.narrows_runs:
        return rows.filter(visible)
    return rows.filter(run__in=runs.values("pk"))


@dataclass
class HomeCounts:
    by_status: dict[str, int]
    waiting_decision: int
    waiting_event: int
    escalated: int
    escalated_by_reason: dict[str, int]
    pools: list[dict[str, Any]]
    near_ceiling: list[dict[str, Any]]
    #: The newest live event id when counted: the client's catch-up mark.
    last_event_id: int
    #: Whom they were counted for: the runs the user may see.
    scope: RunScope


def home_counts_for_user(user: User, filters: HomeFilters | None = None) -> HomeCounts:
    """What needs attention, counted over the runs ``user`` may see (five queries whatever the
    number of runs, plus one for the object permissions of a user who does not see every run):
    runs by status, open waits by kind and escalation reason, steps queued and running per pool,
    runs near their cost ceiling, and the newest event id."""
    filters = filters or HomeFilters()
    scope = run_scope(user)
    # Read first: the counts then show at least what this mark promises (a client that has seen
    # the mark does not ask for a catch-up).
    last = latest_audit_event_id()
    runs = _home_runs(scope, filters)
    by_status: dict[str, int] = {}
    for row in _count_by_status(_home_filtered(filters), scope):
        by_status[row["status"]] = by_status.get(row["status"], 0) + row["n"]
    waits = (
        _of_runs(Wait.objects.filter(status=WaitStatus.OPEN), runs, filters, scope.waits())
        .order_by()
        .values("kind", why=KeyTextTransform("why", "action"))
        .annotate(n=Count("id"))
    )
    kinds: dict[str, int] = {}
    reasons: dict[str, int] = {label: 0 for label, _ in ESCALATION_REASONS}
    for row in waits:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + row["n"]
        if row["kind"] == WaitKind.ESCALATION:
            label = _escalation_reason(row["why"] or "")
            reasons[label] = reasons.get(label, 0) + row["n"]
    pools: dict[str, dict[str, Any]] = {}
    for row in (
        # Two equalities rather than IN: each matches its partial index (``step_queued_idx``,
        # ``step_running_idx``), so only queued and running steps are read, never the table.
        _of_runs(
            Step.objects.filter(Q(status=StepStatus.QUEUED) | Q(status=StepStatus.RUNNING)),
            runs,
            filters,
            scope.steps(),
        )
        .order_by()
        .values("pool", "status")
        .annotate(n=Count("id"))
    ):
        entry = pools.setdefault(
            row["pool"] or "default", {"pool": row["pool"] or "default", "running": 0, "queued": 0}
        )
        entry["running" if row["status"] == StepStatus.RUNNING else "queued"] += row["n"]
    near = list(
        SpendScope.objects.filter(kind=ScopeKind.RUN, limit__gt=0)
        .annotate(used=F("reserved") + F("spent"))
        .filter(used__gte=F("soft_ratio") * F("limit"))
        .order_by("-updated_at")
        .values("key", "used", "limit")[:20]
    )
    if near:
        visible = {
            pk: (workflow, status)
            for pk, workflow, status in runs.filter(
                pk__in=[int(r["key"]) for r in near if r["key"].isdigit()]
            ).values_list("pk", "workflow_name", "status")
        }
        near = [
            {
                **r,
                "run_id": int(r["key"]),
                "workflow": visible[int(r["key"])][0],
                "status": visible[int(r["key"])][1],
                "percent": int(r["used"] * 100 / r["limit"]),
            }
            for r in near
            if r["key"].isdigit() and int(r["key"]) in visible
        ]
    return HomeCounts(
        by_status=by_status,
        waiting_decision=kinds.get(WaitKind.APPROVAL, 0),
        waiting_event=kinds.get(WaitKind.EVENT, 0),
        escalated=kinds.get(WaitKind.ESCALATION, 0),
        escalated_by_reason=reasons,
        pools=sorted(pools.values(), key=lambda p: p["pool"]),
        near_ceiling=near,
        last_event_id=last,
        scope=scope,
    )


def _count_by_status(runs: QuerySet[Run], scope: RunScope) -> QuerySet[Any]:
    """Rows of (status, n) counting the ``runs`` ``scope`` sees: one query, of the parts of
    :meth:`RunScope.runs_apart` (a status may come in more than one row)."""
    parts = [
        runs.filter(part).order_by().values("status").annotate(n=Count("*"))
        for part in scope.runs_apart()
    ]
    return parts[0].union(*parts[1:], all=True) if len(parts) > 1 else parts[0]


@dataclass
class NumberedPage:
    items: list[Any]
    total: int
    page: int
    pages: int


def home_runs_for_user(
    user: User,
    filters: HomeFilters | None = None,
    *,
    page: int = 1,
    per_page: int = 25,
    counts: HomeCounts | None = None,
) -> NumberedPage:
    """The filtered runs, newest first, a page at a time with the honest total (from
    ``counts``, the same user's and filters' :func:`home_counts_for_user`, when given: its
    total and whom it counted for, with no query)."""
    scope = counts.scope if counts is not None else run_scope(user)
    qs = _home_runs(scope, filters or HomeFilters())
    if filters and filters.status:
        qs = qs.filter(status=filters.status)
    if counts is not None:
        by_status = counts.by_status
        total = (
            by_status.get(filters.status, 0)
            if filters and filters.status
            else sum(by_status.values())
        )
    else:
        total = qs.count()
    pages = max(1, -(-total // per_page))
    page = min(max(page, 1), pages)
    items = list(qs.order_by("-created_at", "-id")[(page - 1) * per_page : page * per_page])
    return NumberedPage(items=items, total=total, page=page, pages=pages)


@dataclass
class InboxItem:
    wait: Wait
    #: Why this user may not act on it (None: they may), in words.
    refusal: str | None
    #: Who can act when this user may not, e.g. "tier 3 — lead".
    who_can_act: str
    claimed_by: str
    claimed_until: datetime | None
    #: When it breaches its SLA and climbs a tier (at tier 3, or past its expiry: the expiry).
    sla_due_at: datetime

    #: The refusal's code (``tier_too_low``, ...) and the tier this user holds.
    refusal_code: str | None = None
    user_tier: int = 0

    @property
    def actionable(self) -> bool:
        return self.refusal is None

    @property
    def refusal_line(self) -> str:
        """Why this user may not act, in one short line for the inbox list: a tier too low
        says which tier it needs, who holds it and what this user holds."""
        if self.refusal is None:
            return ""
        if self.refusal_code == Code.TIER_TOO_LOW:
            held = f"you hold tier {self.user_tier}" if self.user_tier else "you hold no tier"
            return f"{self.who_can_act[:1].upper()}{self.who_can_act[1:]} · {held}"
        return f"{self.refusal[:1].upper()}{self.refusal[1:]}"


def _tier_holders() -> dict[int, list[str]]:
    """The groups holding each tier's permission (a role's name says who to ask)."""
    holders: dict[int, list[str]] = {tier: [] for tier in TIERS}
    codenames = {perm.split(".", 1)[1]: tier for tier, perm in TIERS.items()}
    for name, codename in Group.objects.filter(
        permissions__codename__in=list(codenames)
    ).values_list("name", "permissions__codename"):
        holders[codenames[codename]].append(name)
    return holders


#: How many users :func:`wait_deciders` checks at most (each check reads their permissions).
DECIDERS_CHECKED = 50


def wait_deciders(wait: Wait, limit: int = 5) -> tuple[list[str], int]:
    """Who may decide ``wait`` now (the same rule as :func:`wait_refusal`: tier, the run's
    tenant and workflow, not one's own run for an approval): up to ``limit`` usernames in
    order, and how many there are in all. Only active users holding a high enough tier, or
    superusers, are checked, at most :data:`DECIDERS_CHECKED` of them."""
    perms = [perm.split(".", 1)[1] for tier, perm in TIERS.items() if tier >= wait.tier]
    candidates = (
        User.objects.filter(is_active=True)
        .filter(
            Q(is_superuser=True)
            | Q(groups__permissions__codename__in=perms)
            | Q(user_permissions__codename__in=perms)
        )
        .distinct()
        .order_by("username")[:DECIDERS_CHECKED]
    )
    names = [u.get_username() for u in candidates if wait_refusal(u, wait) is None]
    return names[:limit], len(names)


#: The highest tier an SLA breach escalates an item to.
SLA_MAX_TIER = 3


def sla_period() -> timedelta:
    """How long an open approval or escalation may wait at one tier before it escalates, when
    nothing (a policy's ``sla``) set its ``sla_due_at``."""
    return timedelta(seconds=getattr(settings, "SIGNALBOX_SLA_SECONDS", 1800))


def wait_sla_due(wait: Wait) -> datetime:
    """When ``wait`` next breaches its SLA (``waits_escalate_breached``'s rule), or expires if
    that comes first or it cannot climb any higher."""
    if wait.tier >= SLA_MAX_TIER:
        return wait.deadline_at
    due = wait.sla_due_at or wait.created_at + sla_period()
    return min(due, wait.deadline_at)


def _sla_due_expression() -> Case:
    """:func:`wait_sla_due` as SQL, to order the inbox by what it shows as due."""
    default_due = ExpressionWrapper(
        F("created_at") + Value(sla_period(), output_field=DurationField()),
        output_field=DateTimeField(),
    )
    return Case(
        When(tier__gte=SLA_MAX_TIER, then=F("deadline_at")),
        default=Least(Coalesce(F("sla_due_at"), default_due), F("deadline_at")),
        output_field=DateTimeField(),
    )


def _inbox_item(user: User, wait: Wait, holders: dict[int, list[str]], now: datetime) -> InboxItem:
    refusal = wait_refusal(user, wait)
    roles = sorted({name for tier, names in holders.items() if tier >= wait.tier for name in names})
    who = f"needs tier {wait.tier}" + (f" — {', '.join(roles)}" if roles else "")
    claim: WaitClaim | None = getattr(wait, "claim", None)  # None when unclaimed
    live = claim is not None and claim.expires_at > now
    return InboxItem(
        wait=wait,
        refusal=refusal[0] if refusal else None,
        who_can_act=who,
        claimed_by=claim.user.get_username() if live and claim is not None else "",
        claimed_until=claim.expires_at if live and claim is not None else None,
        sla_due_at=wait_sla_due(wait),
        refusal_code=refusal[1] if refusal else None,
        user_tier=int(refusal[2].get("your_tier", 0)) if refusal else 0,
    )


def _inbox_waits(scope: RunScope) -> QuerySet[Wait]:
    qs = Wait.objects.filter(
        scope.waits(), status=WaitStatus.OPEN, kind__in=(WaitKind.APPROVAL, WaitKind.ESCALATION)
    )
    return _inbox_waits_of(qs)


def _inbox_waits_of(qs: QuerySet[Wait]) -> QuerySet[Wait]:
    """``qs`` read as the inbox list shows it: with run, step and claim, without payloads."""
    return qs.select_related("run", "step", "claim__user").defer(*_INBOX_UNREAD)


#: What the inbox list never shows of an item's run and step: their payloads, state and logs
#: (the item's own page reads them), up to 200 rows of JSON read and parsed for nothing.
_INBOX_UNREAD = (
    *(
        f"run__{name}"
        for name in (
            "input",
            "output",
            "state",
            "state_versions",
            "node_visits",
            "pending_joins",
            "notes",
            "degraded",
            "error_message",
        )
    ),
    *(
        f"step__{name}"
        for name in (
            "input",
            "input_override",
            "output",
            "usage",
            "error_detail",
            "attempts_log",
            "error_message",
        )
    ),
    "payload",
    "edited_input",
)


def inbox_for_user(
    user: User,
    *,
    limit: int = 200,
    kind: str = "",
    tier: int = 0,
    offset: int = 0,
    scope: RunScope | None = None,
) -> list[InboxItem]:
    """Open approvals and escalations on runs ``user`` may see, soonest SLA deadline first (the
    due time each shows: :func:`wait_sla_due`); those they may not decide are included, saying
    why and who can. ``kind`` and ``tier`` narrow it;
    ``offset`` and ``limit`` page it; ``scope``: the user's :func:`run_scope`, if the caller
    has it."""
    now = datetime.now(tz=UTC)
    scope = scope if scope is not None else run_scope(user)
    # The page is picked from the waits alone (their own columns: a few thousand open rows
    # sorted), then read with its runs and steps: joined before the sort, every open item's run
    # would be read to keep 50.
    page = (
        _inbox_filtered(scope, kind, tier)
        .select_related(None)
        .alias(due=_sla_due_expression())
        .order_by("due", "id")
        .values("id")[offset : offset + limit]
    )
    waits = list(
        _inbox_waits_of(Wait.objects.filter(pk__in=page))
        .alias(due=_sla_due_expression())
        .order_by("due", "id")
    )
    holders = _tier_holders() if waits else {}
    return [_inbox_item(user, wait, holders, now) for wait in waits]


def inbox_count_for_user(
    user: User, *, kind: str = "", tier: int = 0, scope: RunScope | None = None
) -> int:
    """How many open items :func:`inbox_for_user` pages through."""
    scope = scope if scope is not None else run_scope(user)
    return _inbox_filtered(scope, kind, tier).count()


def _inbox_filtered(scope: RunScope, kind: str, tier: int) -> QuerySet[Wait]:
    qs = _inbox_waits(scope)
    if kind:
        qs = qs.filter(kind=kind)
    if tier:
        qs = qs.filter(tier=tier)
    return qs


def inbox_item_for_user(user: User, wait_id: int) -> InboxItem:
    """One approval or escalation (open or decided) on a run ``user`` may see, or NotFound."""
    qs = Wait.objects.filter(pk=wait_id, kind__in=(WaitKind.APPROVAL, WaitKind.ESCALATION))
    wait = (
        qs.filter(run__in=runs_visible_to(user))
        .select_related("run", "step", "claim__user", "decided_by")
        .first()
    )
    if wait is None:
        raise NotFound(f"no approval or escalation {wait_id}", code=Code.WAIT_NOT_FOUND)
    return _inbox_item(user, wait, _tier_holders(), datetime.now(tz=UTC))


def run_spend(run: Run) -> dict[str, Any] | None:
    """The run's spend scope (spent, reserved, limit), if the ledger has one."""
    row = (
        SpendScope.objects.filter(kind=ScopeKind.RUN, key=str(run.pk))
        .values("spent", "reserved", "limit", "soft_ratio")
        .first()
    )
    return dict(row) if row is not None else None


def latest_event_id() -> int:
    """A live page's catch-up mark: the newest audit row's id (every change writes one)."""
    return latest_audit_event_id()


def run_retry_point(run: Run, steps: list[Step] | None = None) -> tuple[Step | None, str]:
    """The step a failed ``run`` would be retried from (its latest failed agent or map-item
    step), or None and why it cannot be: only a run that failed at one step, with nothing
    cancelled by its failure and nothing undone, picks up where it stopped. ``steps``: the run's
    steps when the caller has them (no query)."""
    steps = run_steps(run) if steps is None else steps
    if any(s.kind == "compensate" for s in steps):
        return None, "its completed steps were undone after it failed"
    if any(s.status == "cancelled" for s in steps):
        return None, "steps that ran beside the failed one were cancelled when it failed"
    failed = [s for s in steps if s.status == "failed" and s.kind in ("agent", "item")]
    if not failed:
        return None, "no step failed (the run itself was stopped)"
    return failed[-1], ""


def run_tool_calls(run: Run) -> list[Any]:
    """The run's tool calls, oldest first (the page shows them per step)."""
    return list(ToolCall.objects.filter(run=run).order_by("id"))


def run_policy_decisions(run: Run) -> list[Any]:
    """Every policy decision made for the run (rule, version, outcome, tier, reason)."""
    return list(
        PolicyDecision.objects.filter(run_id=run.pk).select_related("version").order_by("id")
    )
