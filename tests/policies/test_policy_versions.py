"""A policy version's life (issue 18): draft -> submitted -> approved by a second admin ->
active; four eyes; rollback to an earlier version; a document with an error never submitted;
each step in the audit log; the engine enforces the active version at once."""

from __future__ import annotations

from typing import Any

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from policies.active import active_policy
from policies.errors import Code, PolicyConflict, PolicyDenied
from policies.models import Policy, PolicyStatus
from policies.services import policy_activate, policy_draft, policy_review, policy_submit
from policies.source import PolicySourceError
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

V1 = "default: allow\nrules: []\n"
V2 = """default: allow
rules:
  - id: refunds
    description: Refunds need a person
    action: agent:refund_executor
    outcome: {decision: require_approval, tier: 1}
"""


@pytest.fixture
def admins() -> tuple[Any, Any]:
    return UserFactory(username="ada"), UserFactory(username="bob")


def _live(source: str, author: Any, reviewer: Any) -> Any:
    version = policy_draft(source=source, author=author, note="why")
    policy_submit(version_id=version.pk, user=author)
    policy_review(version_id=version.pk, user=reviewer, approve=True, note="fine")
    return policy_activate(version_id=version.pk, user=reviewer)


def test_a_version_goes_draft_submitted_approved_active_and_is_enforced_at_once(
    admins: tuple[Any, Any],
) -> None:
    ada, bob = admins
    version = _live(V2, ada, bob)
    assert version.status == PolicyStatus.ACTIVE and version.number == 1
    active = active_policy()
    assert active is not None and active.number == 1 and active.version_id == version.pk
    verbs = list(
        AuditEvent.objects.filter(object_type="policy_version")
        .order_by("id")
        .values_list("verb", "actor_id")
    )
    assert verbs == [
        (Verb.POLICY_DRAFTED, "ada"),
        (Verb.POLICY_SUBMITTED, "ada"),
        (Verb.POLICY_APPROVED, "bob"),
        (Verb.POLICY_ACTIVATED, "bob"),
    ]


def test_four_eyes_an_author_neither_approves_nor_activates_their_version(
    admins: tuple[Any, Any],
) -> None:
    ada, bob = admins
    version = policy_draft(source=V1, author=ada)
    policy_submit(version_id=version.pk, user=ada)
    with pytest.raises(PolicyDenied) as review:
        policy_review(version_id=version.pk, user=ada, approve=True)
    assert review.value.code == Code.FOUR_EYES
    policy_review(version_id=version.pk, user=bob, approve=True)
    with pytest.raises(PolicyDenied):
        policy_activate(version_id=version.pk, user=ada)
    assert Policy.objects.get(name="default").active_version is None
    policy_activate(version_id=version.pk, user=bob)


def test_a_rejection_needs_a_reason_and_only_approved_versions_go_live(
    admins: tuple[Any, Any],
) -> None:
    ada, bob = admins
    version = policy_draft(source=V1, author=ada)
    with pytest.raises(PolicyConflict):
        policy_activate(version_id=version.pk, user=bob)  # a draft
    policy_submit(version_id=version.pk, user=ada)
    with pytest.raises(PolicyConflict) as no_reason:
        policy_review(version_id=version.pk, user=bob, approve=False)
    assert no_reason.value.code == Code.REASON_REQUIRED
    assert (
        policy_review(version_id=version.pk, user=bob, approve=False, note="too loose").status
        == "rejected"
    )


def test_rolling_back_activates_an_earlier_version_and_retires_the_current(
    admins: tuple[Any, Any],
) -> None:
    ada, bob = admins
    first = _live(V1, ada, bob)
    second = _live(V2, bob, ada)
    first.refresh_from_db()
    assert first.status == PolicyStatus.RETIRED and second.status == PolicyStatus.ACTIVE
    policy_activate(version_id=first.pk, user=bob, note="v2 blocks refunds by mistake")
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (PolicyStatus.ACTIVE, PolicyStatus.RETIRED)
    assert Policy.objects.get(name="default").active_version_id == first.pk


def test_a_document_with_an_error_is_never_a_version_and_the_error_names_field_and_line(
    admins: tuple[Any, Any],
) -> None:
    broken = V2.replace("tier: 1", "tier: 7")
    with pytest.raises(PolicySourceError) as error:
        policy_draft(source=broken, author=admins[0])
    (problem,) = error.value.problems
    assert problem.line == 6 and "tier" in problem.path
    assert not Policy.objects.filter(versions__isnull=False).exists()
