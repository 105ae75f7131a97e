"""Every write to policies: drafting a version, submitting it, reviewing it (a second admin),
activating it (or rolling back to an earlier one). Four eyes: the admin who authored a version
can neither approve nor activate it. Each service owns its transaction and records its audit
event in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from audit.services import Entry, audit_record_many
from audit.verbs import ActorType, Verb
from infra.canonical import digest
from policies import active
from policies.errors import Code, PolicyConflict, PolicyDenied, PolicyNotFound
from policies.models import Policy, PolicyStatus, PolicyVersion
from policies.source import policy_source_parse

#: The policy the engine enforces unless settings name another.
DEFAULT_POLICY = "default"


def _actor(user: User | None) -> tuple[str, str]:
    return (ActorType.HUMAN, user.get_username()) if user is not None else (ActorType.SYSTEM, "")


def _record(
    verb: Verb, version: PolicyVersion, user: User | None, now: datetime, **data: object
) -> None:
    actor_type, actor_id = _actor(user)
    audit_record_many(
        [
            Entry(
                verb=verb,
                object_type="policy_version",
                object_id=version.pk,
                actor_type=actor_type,
                actor_id=actor_id,
                data={"policy": version.policy.name, "number": version.number, **data},
            )
        ],
        now=now,
    )


def _locked(version_id: int) -> PolicyVersion:
    version = (
        PolicyVersion.objects.select_for_update()
        .select_related("policy")
        .filter(pk=version_id)
        .first()
    )
    if version is None:
        raise PolicyNotFound(f"no policy version {version_id}", code=Code.VERSION_NOT_FOUND)
    return version


def policy_draft(
    *, source: str, author: User | None, note: str = "", policy_name: str = DEFAULT_POLICY
) -> PolicyVersion:
    """A new draft version of ``policy_name`` from ``source`` (YAML or JSON). A source with an
    error is refused (``PolicySourceError``: each problem with its field and line)."""
    document = policy_source_parse(source)
    now = timezone.now()
    with transaction.atomic():
        policy, _ = Policy.objects.select_for_update().get_or_create(name=policy_name)
        number = (
            PolicyVersion.objects.filter(policy=policy).aggregate(n=Max("number"))["n"] or 0
        ) + 1
        as_json = document.to_json()
        version = PolicyVersion.objects.create(
            policy=policy,
            number=number,
            status=PolicyStatus.DRAFT,
            source=source,
            document=as_json,
            digest=digest(as_json),
            note=note,
            author=author,
            created_at=now,
        )
        _record(Verb.POLICY_DRAFTED, version, author, now, note=note)
    return version


def policy_submit(*, version_id: int, user: User | None) -> PolicyVersion:
    """A draft goes for review; its document can no longer change."""
    now = timezone.now()
    with transaction.atomic():
        version = _locked(version_id)
        if version.status != PolicyStatus.DRAFT:
            raise PolicyConflict(
                f"version {version.number} is {version.status}, not a draft", code=Code.NOT_A_DRAFT
            )
        policy_source_parse(version.source)  # a document with an error can never be submitted
        version.status, version.submitted_at = PolicyStatus.SUBMITTED, now
        version.save(update_fields=["status", "submitted_at"])
        _record(Verb.POLICY_SUBMITTED, version, user, now)
    return version


def policy_review(*, version_id: int, user: User, approve: bool, note: str = "") -> PolicyVersion:
    """A second admin approves or rejects a submitted version (not its author)."""
    now = timezone.now()
    with transaction.atomic():
        version = _locked(version_id)
        if version.status != PolicyStatus.SUBMITTED:
            raise PolicyConflict(
                f"version {version.number} is {version.status}, not submitted",
                code=Code.NOT_SUBMITTED,
            )
        if version.authored_by(user):
            raise PolicyDenied(
                "you wrote this version: another admin must review it", code=Code.FOUR_EYES
            )
        if not approve and not note.strip():
            raise PolicyConflict("say why the version is rejected", code=Code.REASON_REQUIRED)
        version.status = PolicyStatus.APPROVED if approve else PolicyStatus.REJECTED
        version.reviewed_by, version.reviewed_at, version.review_note = user, now, note
        version.save(update_fields=["status", "reviewed_by", "reviewed_at", "review_note"])
        _record(
            Verb.POLICY_APPROVED if approve else Verb.POLICY_REJECTED, version, user, now, note=note
        )
    return version


def policy_activate(*, version_id: int, user: User | None, note: str = "") -> PolicyVersion:
    """Put an approved version (or a retired one: a rollback) in force; the one it replaces is
    retired. An admin cannot activate a version they authored (``user`` None: the system, for
    the demo's first policy)."""
    now = timezone.now()
    with transaction.atomic():
        version = _locked(version_id)
        if version.status not in (PolicyStatus.APPROVED, PolicyStatus.RETIRED):
            raise PolicyConflict(
                f"version {version.number} is {version.status}: only an approved version, or one that was "
                "active before, can be activated",
                code=Code.NOT_APPROVED,
            )
        if version.authored_by(user):
            raise PolicyDenied(
                "you wrote this version: another admin must activate it", code=Code.FOUR_EYES
            )
        policy = Policy.objects.select_for_update().get(pk=version.policy_id)
        previous = policy.active_version_id
        if previous is not None and previous != version.pk:
            PolicyVersion.objects.filter(pk=previous).update(status=PolicyStatus.RETIRED)
        version.status, version.activated_by, version.activated_at = PolicyStatus.ACTIVE, user, now
        version.save(update_fields=["status", "activated_by", "activated_at"])
        policy.active_version = version
        policy.save(update_fields=["active_version"])
        _record(Verb.POLICY_ACTIVATED, version, user, now, note=note, replaced=previous)
        transaction.on_commit(active.active_forget)
    return version


@dataclass
class Installed:
    version: PolicyVersion
    created: bool


def policy_install(*, source: str, policy_name: str = DEFAULT_POLICY, note: str = "") -> Installed:
    """Make ``source`` the active policy if none is active yet (the demo's first start, a new
    deployment's bootstrap): drafted, submitted, approved and activated by the system, each step
    recorded. An existing active policy is left alone."""
    existing = (
        Policy.objects.filter(name=policy_name, active_version__isnull=False)
        .select_related("active_version")
        .first()
    )
    if existing is not None and existing.active_version is not None:
        return Installed(existing.active_version, created=False)
    version = policy_draft(source=source, author=None, note=note, policy_name=policy_name)
    policy_submit(version_id=version.pk, user=None)
    now = timezone.now()
    with transaction.atomic():
        version = _locked(version.pk)
        version.status, version.reviewed_at, version.review_note = (
            PolicyStatus.APPROVED,
            now,
            "installed by the system",
        )
        version.save(update_fields=["status", "reviewed_at", "review_note"])
        _record(Verb.POLICY_APPROVED, version, None, now, note="installed by the system")
    return Installed(policy_activate(version_id=version.pk, user=None, note=note), created=True)


def policy_rollback(*, version_id: int, user: User, reason: str) -> PolicyVersion:
    """Put back in force a version that was active before (``retired``), saying why; four eyes
    still hold (not a version ``user`` wrote). The audit event says it was a rollback."""
    if not reason.strip():
        raise PolicyConflict("say why the policy is rolled back", code=Code.REASON_REQUIRED)
    with transaction.atomic():
        version = _locked(version_id)
        if version.status != PolicyStatus.RETIRED:
            raise PolicyConflict(
                f"version {version.number} is {version.status}: only a version that was active before "
                "can be rolled back to",
                code=Code.NOT_RETIRED,
            )
        return policy_activate(version_id=version.pk, user=user, note=f"rollback: {reason.strip()}")
