"""A user's account: API tokens (made, shown once, revoked, expiring), time zone, navigation,
headers and the admin for staff."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from console.accounts import token_issue, token_revoke
from console.models import ApiToken
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_tokens_page_makes_a_token_shown_once_that_the_api_accepts(operator: Any) -> None:
    client = logged_in(operator)
    response = client.post("/account/tokens/", {"name": "nightly import", "expires_days": "30"})
    assert response.status_code == 200
    raw = re.search(r'id="raw-token"[^>]*value="(sbx_[^"]+)"', response.content.decode()).group(1)
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(user=operator)
    assert token.name == "nightly import"
    assert timedelta(days=29) < token.expires_at - timezone.now() <= timedelta(days=30)
    # The raw value is never shown again, nor written to the audit trail.
    assert raw not in client.get("/account/tokens/").content.decode()
    event = AuditEvent.objects.get(verb=Verb.TOKEN_ISSUED)
    assert raw not in str(event.data) and event.data["prefix"] == token.prefix
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/runs").status_code == 200


def test_revoked_token_is_refused_with_its_own_code(operator: Any) -> None:
    token, raw = token_issue(operator, "ci")
    response = logged_in(operator).post(f"/account/tokens/{token.pk}/revoke/")
    assert response.status_code == 302
    response = Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/runs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_revoked"
    assert AuditEvent.objects.filter(verb=Verb.TOKEN_REVOKED, object_id=str(token.pk)).count() == 1
    page = logged_in(operator).get("/account/tokens/").content.decode()
    assert "revoked" in page


def test_expired_token_is_refused_with_its_own_code(operator: Any) -> None:
    token, raw = token_issue(operator, "short", expires_days=7)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/api/v1/runs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_expired"


def test_a_user_cannot_revoke_someone_elses_token(operator: Any, viewer: Any) -> None:
    token, _ = token_issue(operator, "mine")
    assert logged_in(viewer).post(f"/account/tokens/{token.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None
    with pytest.raises(ApiToken.DoesNotExist):
        token_revoke(viewer, token.pk)


@pytest.mark.parametrize(
    "data",
    [
        {"name": "", "expires_days": "30"},
        {"name": "x", "expires_days": "400"},
        {"name": "x", "expires_days": "soon"},
    ],
)
def test_tokens_page_refuses_bad_input(operator: Any, data: dict[str, str]) -> None:
    response = logged_in(operator).post("/account/tokens/", data)
    assert response.status_code == 400
    assert 'role="alert"' in response.content.decode()
    assert not ApiToken.objects.exists()


def test_time_zone_setting_changes_how_times_are_shown(operator: Any) -> None:
    client = logged_in(operator)
    assert client.post("/account/", {"time_zone": "Mars/Olympus"}).status_code == 400
    response = client.post("/account/", {"time_zone": "Asia/Tokyo"})
    assert response.status_code == 200
    token_issue(operator, "tz")
    page = client.get("/account/tokens/").content.decode()
    assert "JST" in page  # the exact time in the title, in the user's zone
    assert "Times are shown in Asia/Tokyo" in page
    # A new login keeps the zone.
    page = logged_in(operator).get("/account/tokens/").content.decode()
    assert "Times are shown in Asia/Tokyo" in page


def test_pages_send_csp_and_permissions_policy(operator: Any) -> None:
    response = logged_in(operator).get("/account/tokens/")
    csp = response["Content-Security-Policy"]
    assert (
        "default-src 'self'" in csp
        and "script-src 'self'" in csp
        and "frame-ancestors 'none'" in csp
    )
    assert "unsafe-inline" not in csp
    assert "camera=()" in response["Permissions-Policy"]
    assert "<script>" not in response.content.decode()
    assert "onclick" not in response.content.decode()


def test_navigation_follows_the_role(db: None) -> None:
    from policies.roles import roles_sync

    groups = roles_sync()
    auditor = UserFactory(username="aud")
    auditor.groups.add(groups["Auditor"])
    admin = UserFactory(username="adm", is_staff=True)
    admin.groups.add(groups["Policy admin"])
    auditor_page = logged_in(auditor).get("/account/").content.decode()
    admin_page = logged_in(admin).get("/account/").content.decode()
    assert "Users &amp; grants" in admin_page and "Tools" in admin_page
    assert "Users &amp; grants" not in auditor_page and ">Tools<" not in auditor_page
    assert "(Auditor)" in auditor_page
    # an auditor reads policies (never edits them): the link is there, and the page opens
    assert 'href="/policies/"' in auditor_page
    assert logged_in(auditor).get("/policies/").status_code == 200


def test_staff_admin_grants_a_tenant_permission_and_an_operator_cannot(operator: Any) -> None:
    from guardian.shortcuts import get_perms

    from policies.models import Tenant
    from policies.roles import roles_sync

    admin = UserFactory(username="boss", is_staff=True)  # as the demo's admin: staff, not superuser
    admin.groups.add(roles_sync()["Policy admin"])
    tenant = Tenant.objects.get(slug="default")
    client = logged_in(admin)
    operator.groups.add(roles_sync()["Operator tier 2"])
    people = client.get("/admin/auth/user/")
    assert people.status_code == 200
    # each person's roles in the list: who holds which tier, at a glance
    row = re.search(rf"<tr>.*?>{operator.username}</a>.*?</tr>", people.content.decode(), re.S)
    assert row is not None and "Operator tier 2" in row.group(0)
    url = f"/admin/policies/tenant/{tenant.pk}/permissions/"
    assert client.get(url).status_code == 200
    response = client.post(
        f"/admin/policies/tenant/{tenant.pk}/permissions/user-manage/{operator.pk}/",
        {"permissions": ["submit_runs"]},
    )
    assert response.status_code == 302
    assert "submit_runs" in get_perms(operator, tenant)
    # Groups (roles, tiers) yes; superuser status no.
    page = client.get(f"/admin/auth/user/{operator.pk}/change/").content.decode()
    assert 'name="groups"' in page and 'name="is_superuser"' not in page
    assert logged_in(operator).get("/admin/auth/user/").status_code == 302


def test_service_account_command_prints_a_token_that_submits_for_its_tenant(db: None) -> None:
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    out = StringIO()
    call_command(
        "service_account",
        "importer",
        "--tenant",
        "default",
        "--expires-days",
        "30",
        stdout=out,
        stderr=StringIO(),
    )
    raw = out.getvalue().strip()
    assert raw.startswith("sbx_")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = client.post(
        "/api/v1/runs",
        {"workflow": "research_brief", "input": {"question": "Q?"}, "tenant": "default"},
        content_type="application/json",
    )
    assert response.status_code in (200, 201), response.content
    # Run again: the same account, a second token.
    call_command("service_account", "importer", stdout=StringIO(), stderr=StringIO())
    assert ApiToken.objects.filter(user__username="importer").count() == 2
    with pytest.raises(CommandError):
        call_command(
            "service_account", "importer", "--tenant", "nope", stdout=StringIO(), stderr=StringIO()
        )


def test_when_tag_shows_relative_time_with_the_exact_time_in_the_users_zone() -> None:
    from django.template import Context, Template

    now = timezone.now()
    template = Template("{% load console_time %}{% when value %}")
    with timezone.override("Europe/Berlin"):
        html = template.render(Context({"value": now - timedelta(minutes=3)}))
    assert html.startswith('<time datetime="') and ">3 min ago</time>" in html
    assert "CET" in html or "CEST" in html
    assert ">in 2 h<" in template.render(Context({"value": now + timedelta(hours=2, seconds=5)}))
    assert template.render(Context({"value": None})) == "—"


def test_page_times_follow_the_active_zone() -> None:
    from django.template import Context, Template

    template = Template("{% load console_tags %}{% utc_time value %}")
    value = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    assert "12:00:00 UTC</time>" in template.render(Context({"value": value}))
    with timezone.override("Asia/Tokyo"):
        assert "21:00:00 JST</time>" in template.render(Context({"value": value}))
