"""Five failed logins lock a username out from that address; every failure is audited."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from audit.models import AuditEvent
from audit.verbs import Verb

pytestmark = pytest.mark.django_db


def test_five_failed_logins_lock_out_even_the_right_password(operator: Any) -> None:
    operator.set_password("correct horse battery")
    operator.save()
    client = Client()
    for _ in range(4):
        response = client.post("/accounts/login/", {"username": "operator", "password": "wrong"})
        assert response.status_code == 200  # the form again, with its error
    response = client.post("/accounts/login/", {"username": "operator", "password": "wrong"})
    assert response.status_code == 429
    assert "Too many failed logins" in response.content.decode()
    response = client.post(
        "/accounts/login/", {"username": "operator", "password": "correct horse battery"}
    )
    assert response.status_code == 429
    assert AuditEvent.objects.filter(verb=Verb.LOGIN_FAILED, object_id="operator").count() >= 5
    assert AuditEvent.objects.filter(verb=Verb.LOGIN_LOCKED_OUT, object_id="operator").exists()
    # Another address is not locked out.
    other = Client(REMOTE_ADDR="10.0.0.9")
    response = other.post(
        "/accounts/login/", {"username": "operator", "password": "correct horse battery"}
    )
    assert response.status_code == 302
