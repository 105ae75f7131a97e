"""The tool registry as operators see it: API and console page agree, with live provider state."""

from __future__ import annotations

import pytest
from django.utils import timezone

from console.models import ApiToken
from orchestration.models import ToolCall

pytestmark = pytest.mark.django_db


def record(provider: str, status: str) -> None:
    ToolCall.objects.create(
        capability="test_effect", provider=provider, attempt=1, status=status, created_at=timezone.now()
    )


def test_capabilities_api_lists_providers_with_health_and_circuit(viewer, client):
    record("test-effect", "succeeded")
    record("test-effect", "failed")
    _, raw = ApiToken.issue(viewer, "t")
    response = client.get("/api/v1/capabilities", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    by_name = {c["name"]: c for c in response.json()}
    provider = by_name["test_effect"]["providers"][0]
    assert by_name["test_effect"]["side_effects"] is True
    assert provider["name"] == "test-effect"
    assert provider["health"]["attempts"] == 2 and provider["health"]["success_rate"] == 0.5
    assert provider["circuit"]["state"] == "closed"


def test_capabilities_need_a_permission(stranger, client):
    _, raw = ApiToken.issue(stranger, "t")
    response = client.get("/api/v1/capabilities", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "view_denied"
    assert client.get("/api/v1/capabilities").status_code == 401


def test_tools_page_shows_each_provider_state(viewer, client):
    record("test-effect", "succeeded")
    client.force_login(viewer)
    page = client.get("/tools/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="capability-test_effect"' in html
    assert "1 of 1 succeeded" in html
    assert "closed" in html


def test_tools_page_is_for_logged_in_users_with_view_permission(stranger, client):
    assert client.get("/tools/").status_code == 302
    client.force_login(stranger)
    assert client.get("/tools/").status_code == 403
