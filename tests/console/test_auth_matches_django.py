"""The bearer-token check's hand-written SQL (the token, its user and the user's permissions in
one query) and SingleQueryModelBackend, pinned against Django's own ModelBackend: the same
user, the same permission set, for every kind of user. An upgrade of Django that changes what
its backend grants fails here."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.contrib.auth.models import AnonymousUser, Group, Permission
from django.test import RequestFactory
from django.utils import timezone

from console.auth import ApiTokenAuth, SingleQueryModelBackend
from console.models import ApiToken
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

User = get_user_model()


@pytest.fixture(autouse=True)
def _fast_passwords(settings: Any) -> None:
    # Ten users per test: PBKDF2's deliberate slowness would be most of this module's time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def permission(name: str) -> Permission:
    app_label, codename = name.split(".")
    return Permission.objects.get(content_type__app_label=app_label, codename=codename)


@pytest.fixture
def users() -> dict[str, Any]:
    """One user of each kind a permission check has to get right."""
    reviewers = Group.objects.create(name="reviewers")
    reviewers.permissions.add(
        permission("orchestration.view_run"), permission("orchestration.decide_run")
    )
    auditors = Group.objects.create(name="auditors")
    auditors.permissions.add(permission("orchestration.view_run"), permission("auth.view_user"))
    direct = UserFactory(permissions=["orchestration.add_run", "auth.view_group"])
    grouped = UserFactory()
    grouped.groups.add(reviewers)
    both = UserFactory(permissions=["orchestration.view_run", "orchestration.add_run"])
    both.groups.add(reviewers, auditors)  # view_run directly and through two groups
    empty_group = UserFactory()
    empty_group.groups.add(Group.objects.create(name="nobody"))
    return {
        "direct": direct,
        "grouped": grouped,
        "direct and through groups": both,
        "no permissions": UserFactory(),
        "in a group without permissions": empty_group,
        "superuser": UserFactory(is_superuser=True),
        "superuser with direct permissions": UserFactory(
            is_superuser=True, permissions=["orchestration.add_run"]
        ),
        "staff": UserFactory(is_staff=True, permissions=["orchestration.view_run"]),
        "inactive": UserFactory(is_active=False, permissions=["orchestration.add_run"]),
        "inactive superuser": UserFactory(is_active=False, is_superuser=True),
    }


def authenticate(raw: str) -> Any:
    request = RequestFactory().get("/api/v1/runs", HTTP_AUTHORIZATION=f"Bearer {raw}")
    return ApiTokenAuth().authenticate(request, raw)


KINDS = [
    "direct",
    "grouped",
    "direct and through groups",
    "no permissions",
    "in a group without permissions",
    "superuser",
    "superuser with direct permissions",
    "staff",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_gives_its_user_exactly_the_permissions_django_gives(
    users: dict[str, Any], kind: str
) -> None:
    user = users[kind]
    _, raw = ApiToken.issue(user, "pinned")

    found = authenticate(raw)

    fresh = User.objects.get(pk=user.pk)
    expected = ModelBackend().get_all_permissions(fresh)
    assert found is not None and found.pk == user.pk
    assert found.get_all_permissions() == expected
    for perm in Permission.objects.select_related("content_type"):
        name = f"{perm.content_type.app_label}.{perm.codename}"
        assert found.has_perm(name) == ModelBackend().has_perm(
            User.objects.get(pk=user.pk), name
        ), name
    # The user the SQL built is the user the ORM loads, field by field.
    for field in User._meta.concrete_fields:
        assert getattr(found, field.attname) == getattr(fresh, field.attname), field.name


@pytest.mark.parametrize("kind", ["inactive", "inactive superuser"])
def test_a_token_of_an_inactive_user_is_refused_as_django_refuses_the_user(
    users: dict[str, Any], kind: str
) -> None:
    user = users[kind]
    _, raw = ApiToken.issue(user, "pinned")
    assert authenticate(raw) is None
    assert not ModelBackend().user_can_authenticate(user)
    assert ModelBackend().get_all_permissions(User.objects.get(pk=user.pk)) == set()


def test_revoked_and_unknown_tokens_are_refused(users: dict[str, Any]) -> None:
    token, raw = ApiToken.issue(users["direct"], "pinned")
    ApiToken.objects.filter(pk=token.pk).update(revoked_at=timezone.now())
    assert authenticate(raw) is None
    assert authenticate("sbx_unknown") is None


def test_a_token_and_a_permission_check_cost_one_query(
    users: dict[str, Any], django_assert_num_queries: Any
) -> None:
    _, raw = ApiToken.issue(users["grouped"], "pinned")
    authenticate(raw)  # its first use is recorded (one UPDATE a minute at most)
    with django_assert_num_queries(1):
        found = authenticate(raw)
        assert found.has_perm("orchestration.decide_run")
        assert not found.has_perm("orchestration.add_run")


@pytest.mark.parametrize("kind", [*KINDS, "inactive", "inactive superuser"])
def test_the_single_query_backend_grants_what_django_grants(
    users: dict[str, Any], kind: str
) -> None:
    pk = users[kind].pk
    ours = SingleQueryModelBackend()
    django = ModelBackend()
    assert ours.get_all_permissions(User.objects.get(pk=pk)) == django.get_all_permissions(
        User.objects.get(pk=pk)
    )
    run_object = object()  # object permissions are guardian's, not the model backend's
    assert ours.get_all_permissions(
        User.objects.get(pk=pk), run_object
    ) == django.get_all_permissions(User.objects.get(pk=pk), run_object)


def test_the_single_query_backend_grants_nothing_to_anonymous_users() -> None:
    assert SingleQueryModelBackend().get_all_permissions(
        AnonymousUser()
    ) == ModelBackend().get_all_permissions(AnonymousUser())
