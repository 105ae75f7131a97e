"""Reads of policies and their versions, with authorization built in so the API and the pages
agree.

Who may do what (global permissions, as the standard groups in ``policies.roles`` hold them):

* **read** policies, versions, diffs and simulations: ``policies.view_policyversion`` (the
  *Policy admin* and *Auditor* groups). Operators do not read policies here: what a policy
  decided for their runs is shown on the run, with the rule and the reason.
* **write** a draft and submit it: ``policies.edit_policy`` (policy admins);
* **review** (approve, reject), **activate** and **roll back**: ``policies.review_policy``
  (policy admins; four eyes is enforced by the services: never a version one wrote).

A refusal raises ``PolicyDenied`` with a stable code and is recorded in the audit log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Count, QuerySet
from django.utils import timezone

from audit.selectors import audit_events_for_object
from audit.services import Entry, audit_record_alone
from audit.verbs import ActorType, Verb
from policies.diff import PolicyDiff, policy_diff, rule_summary
from policies.document import PolicyDocument
from policies.errors import Code, PolicyDenied, PolicyInvalidQuery, PolicyNotFound
from policies.evaluate import compile_policy
from policies.models import Policy, PolicyDecision, PolicyVersion
from policies.simulate import RecordedAction, Simulation, policy_simulate

READ = "policies.view_policyversion"
EDIT = "policies.edit_policy"
REVIEW = "policies.review_policy"

#: Simulation looks back at most this many days, and replays at most this many decisions (the
#: most recent ones) so that a page answers in seconds even on a busy deployment.
SIMULATION_MAX_DAYS = 90
SIMULATION_MAX_DECISIONS = 50_000
#: The version list's page size, at most.
VERSION_PAGE_MAX = 200


@dataclass(frozen=True, slots=True)
class PolicyAbilities:
    """What a user may do with policies: for the pages' buttons and the API's checks."""

    read: bool
    edit: bool
    review: bool


def policy_abilities(user: User | AnonymousUser) -> PolicyAbilities:
    if not user.is_authenticated or not user.is_active:
        return PolicyAbilities(False, False, False)
    return PolicyAbilities(user.has_perm(READ), user.has_perm(EDIT), user.has_perm(REVIEW))


def _refused(user: User | AnonymousUser, what: str, code: str) -> PolicyDenied:
    if user.is_authenticated:
        audit_record_alone(
            Entry(
                verb=Verb.ACCESS_DENIED,
                object_type="policy",
                object_id=user.pk,
                actor_type=ActorType.HUMAN,
                actor_id=user.get_username(),
                data={"code": str(code), "what": what},
            )
        )
    return PolicyDenied(what, code=code)


def policy_read_check(user: User | AnonymousUser) -> None:
    """Refuse (audited) a user who may not read policies."""
    if not policy_abilities(user).read:
        raise _refused(
            user, "you may not read policies (policy admins and auditors may)", Code.READ_DENIED
        )


def policy_edit_check(user: User | AnonymousUser) -> None:
    """Refuse (audited) a user who may not draft or submit policy versions."""
    if not policy_abilities(user).edit:
        raise _refused(
            user, "only policy admins may draft and submit policy versions", Code.EDIT_DENIED
        )


def policy_review_check(user: User | AnonymousUser) -> None:
    """Refuse (audited) a user who may not review, activate or roll back policy versions."""
    if not policy_abilities(user).review:
        raise _refused(
            user,
            "only policy admins may review, activate or roll back policy versions",
            Code.REVIEW_DENIED,
        )


# --- policies and versions --------------------------------------------------------------------


def policy_list_for_user(user: User | AnonymousUser) -> QuerySet[Policy]:
    """Every policy, with its active version and how many versions it has."""
    policy_read_check(user)
    return (
        Policy.objects.select_related("active_version")
        .annotate(version_count=Count("versions"))
        .order_by("name")
    )


def policy_get_for_user(user: User | AnonymousUser, name: str) -> Policy:
    policy_read_check(user)
    policy = Policy.objects.select_related("active_version").filter(name=name).first()
    if policy is None:
        raise PolicyNotFound(f"no policy {name!r}", code=Code.POLICY_NOT_FOUND)
    return policy


@dataclass(frozen=True, slots=True)
class VersionPage:
    items: list[PolicyVersion]
    #: The number to pass as ``before`` for the next (older) page; None on the last page.
    next_before: int | None


def policy_version_page_for_user(
    user: User | AnonymousUser, name: str, *, before: int | None = None, limit: int = 50
) -> VersionPage:
    """One page of ``name``'s versions, newest first, with who wrote, reviewed and activated
    each (one query, whatever the page's length)."""
    policy = policy_get_for_user(user, name)
    if not 1 <= limit <= VERSION_PAGE_MAX:
        raise PolicyInvalidQuery(f"limit must be from 1 to {VERSION_PAGE_MAX}")
    versions = (
        PolicyVersion.objects.filter(policy=policy)
        .select_related("policy", "author", "reviewed_by", "activated_by")
        .defer("source", "document")
        .order_by("-number")
    )
    if before is not None:
        versions = versions.filter(number__lt=before)
    items = list(versions[: limit + 1])
    next_before = items[limit - 1].number if len(items) > limit else None
    return VersionPage(items[:limit], next_before)


def policy_version_get_for_user(user: User | AnonymousUser, version_id: int) -> PolicyVersion:
    policy_read_check(user)
    version = (
        PolicyVersion.objects.select_related("policy", "author", "reviewed_by", "activated_by")
        .filter(pk=version_id)
        .first()
    )
    if version is None:
        raise PolicyNotFound(f"no policy version {version_id}", code=Code.VERSION_NOT_FOUND)
    return version


def policy_versions_for_choice(policy: Policy) -> QuerySet[PolicyVersion]:
    """Every version of ``policy``, newest first, light (for a picker)."""
    return (
        PolicyVersion.objects.filter(policy=policy)
        .only("id", "number", "status", "policy_id")
        .order_by("-number")
    )


def version_document(version: PolicyVersion) -> PolicyDocument:
    """The version's validated document."""
    return PolicyDocument.model_validate(version.document)


@dataclass(frozen=True, slots=True)
class RuleLine:
    id: str
    description: str
    summary: str


def version_rules(version: PolicyVersion) -> list[RuleLine]:
    """Each rule of the version as one readable line."""
    return [
        RuleLine(rule.id, rule.description, rule_summary(rule))
        for rule in version_document(version).rules
    ]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One step of a version's life: what happened, who did it, when and why."""

    verb: str
    actor: str
    at: datetime
    note: str


def policy_version_history(version: PolicyVersion) -> list[HistoryEntry]:
    """The version's life from the audit log, oldest first (an activation after a rollback
    appears again)."""
    entries = []
    for event in audit_events_for_object("policy_version", version.pk):
        data = event.data if isinstance(event.data, dict) else {}
        verb = (
            Verb(event.verb).label.removeprefix("policy.")
            if event.verb in Verb.values
            else str(event.verb)
        )
        entries.append(
            HistoryEntry(
                verb, event.actor_id or "system", event.created_at, str(data.get("note") or "")
            )
        )
    return entries


# --- diff -------------------------------------------------------------------------------------


def policy_version_diff_for_user(
    user: User | AnonymousUser, old_id: int, new_id: int
) -> tuple[PolicyVersion, PolicyVersion, PolicyDiff]:
    """What changed from one version to another (of the same policy), in words and as a
    unified diff of their canonical sources."""
    old = policy_version_get_for_user(user, old_id)
    new = policy_version_get_for_user(user, new_id)
    if old.policy_id != new.policy_id:
        raise PolicyInvalidQuery("the two versions belong to different policies")
    diff = policy_diff(
        version_document(old),
        version_document(new),
        old_label=f"v{old.number}",
        new_label=f"v{new.number}",
    )
    return old, new, diff


# --- simulation -------------------------------------------------------------------------------


@dataclass
class SimulationResult:
    """A version replayed against recorded decisions, and what it is compared with."""

    version: PolicyVersion
    #: The version in force that the draft is compared with; None: no version is active (the
    #: baseline is then an empty policy that allows everything).
    baseline: PolicyVersion | None
    days: int
    since: datetime
    simulation: Simulation
    #: The run of each replayed decision (``PolicyDecision.id`` -> run id), for links.
    runs: dict[int, int] = field(default_factory=dict)
    #: Whether older decisions in the period were left out (over the replay cap).
    capped: bool = False


def policy_simulation_for_user(
    user: User | AnonymousUser,
    version_id: int,
    *,
    days: int = 7,
    examples: int = 5,
    now: datetime | None = None,
) -> SimulationResult:
    """Replay the decisions recorded in the last ``days`` days with ``version`` and with the
    policy's active version, and say what would change (``policies.simulate``)."""
    version = policy_version_get_for_user(user, version_id)
    if not 1 <= days <= SIMULATION_MAX_DAYS:
        raise PolicyInvalidQuery(f"days must be from 1 to {SIMULATION_MAX_DAYS}")
    if not 0 <= examples <= 50:
        raise PolicyInvalidQuery("examples must be from 0 to 50")
    now = now or timezone.now()
    since = now - timedelta(days=days)
    baseline = (
        PolicyVersion.objects.filter(pk=version.policy.active_version_id)
        .select_related("policy")
        .first()
        if version.policy.active_version_id is not None
        else None
    )
    draft = compile_policy(version_document(version), version=version.number)
    current = compile_policy(
        version_document(baseline) if baseline is not None else PolicyDocument(default="allow"),
        version=baseline.number if baseline is not None else None,
    )
    rows = list(
        PolicyDecision.objects.filter(created_at__gte=since, created_at__lte=now)
        .order_by("-created_at", "-id")
        .values_list("id", "run_id", "facts", "outcome", "tier", "rule", "created_at")[
            : SIMULATION_MAX_DECISIONS + 1
        ]
    )
    capped = len(rows) > SIMULATION_MAX_DECISIONS
    rows = rows[:SIMULATION_MAX_DECISIONS]
    rows.reverse()  # history order: examples are the earliest of each change
    runs = {row[0]: row[1] for row in rows if row[1] is not None}
    simulation = policy_simulate(draft, current, _recorded(rows), examples=examples)
    return SimulationResult(version, baseline, days, since, simulation, runs, capped)


def _recorded(rows: list[tuple[Any, ...]]) -> Iterator[RecordedAction]:
    for decision_id, _run_id, facts, outcome, tier, rule, created_at in rows:
        yield RecordedAction(
            facts if isinstance(facts, dict) else {},
            outcome,
            created_at,
            tier=tier,
            rule=rule,
            id=decision_id,
        )
