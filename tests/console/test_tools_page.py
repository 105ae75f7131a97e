"""The tool registry as operators see it: API and console page agree, with live provider state."""

from __future__ import annotations

import random

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from console.demo import demo_users_seed
from console.models import ApiToken
from orchestration.agents.demo.orders import order_id_of_kind
from orchestration.models import ToolCall
from orchestration.services import run_submit

pytestmark = pytest.mark.django_db


def record(provider: str, status: str) -> None:
    ToolCall.objects.create(
        capability="test_effect",
        provider=provider,
        attempt=1,
        status=status,
        created_at=timezone.now(),
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


def test_an_admin_sees_the_demos_providers_with_their_health_and_an_operator_does_not(
    client, drive
):
    demo_users_seed()
    users = get_user_model().objects
    service = users.get(username="simulator")
    rng = random.Random(4)
    # A refund of an order in the archive: its lookups time out; a small one goes through.
    for kind in ("archived", "small"):
        run = run_submit(
            workflow="refund_desk",
            input={
                "order_id": order_id_of_kind(kind, rng),
                "customer_id": "cus_1",
                "message": "It arrived damaged",
            },
            submitted_by=service,
        ).run
        drive(run.pk)

    client.force_login(users.get(username="admin"))
    page = client.get("/tools/")
    assert page.status_code == 200
    html = page.content.decode()
    for capability in ("lookup_order", "send_email", "send_sms"):
        assert f'id="capability-{capability}"' in html
    for provider in ("demo-orders", "demo-mail", "demo-sms", "demo-sms-backup"):
        assert f"<td>{provider} " in html
    # The order system's health counts the archive's time-outs against it.
    calls = ToolCall.objects.filter(provider="demo-orders")
    assert calls.filter(status="failed").exists() and calls.filter(status="succeeded").exists()
    assert f"{calls.filter(status='succeeded').count()} of {calls.count()} succeeded" in html
    # The admin's navigation leads there.
    assert 'href="/tools/"' in client.get("/").content.decode()

    client.force_login(users.get(username="operator"))
    assert client.get("/tools/").status_code == 403
    assert 'href="/tools/"' not in client.get("/").content.decode()


def test_the_tools_page_says_what_to_do_when_nothing_is_registered(
    viewer, client, settings, monkeypatch
):
    monkeypatch.setattr("orchestration.tools.registry.BUILTIN_CAPABILITIES", {})
    settings.SIGNALBOX_CAPABILITIES = {}
    client.force_login(viewer)
    html = client.get("/tools/").content.decode()
    assert "No capability is registered" in html and "SIGNALBOX_CAPABILITIES" in html
