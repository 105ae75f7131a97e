"""Fixtures for the console's tests: the engine runs in this process (steps executed directly,
agents take no time, nothing reaches Redis), and users with the demo roles."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _engine_in_process(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SIGNALBOX = {
        **settings.SIGNALBOX,
        "AGENT_TIME_SCALE": 0.0,
        "LIVE_EVENTS": False,
        # A demo agent's simulated transient failure is retried at once, not after a backoff.
        "RETRY_BASE_SECONDS": 0.0,
    }
    from console.celery import app

    # Celery reads Django's settings once, on first use of app.conf: make that happen with the
    # real settings, or the override below would become the app's broker for the whole session
    # (and the real worker tests that follow would publish to memory).
    app.conf.broker_url  # noqa: B018
    monkeypatch.setitem(app.conf, "broker_url", "memory://")
    settings.CELERY_BROKER_URL = "memory://"
