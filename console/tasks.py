"""Celery tasks of the console layer (beat runs them; see ``CELERY_BEAT_SCHEDULE``)."""

from __future__ import annotations

from dataclasses import asdict

from celery import shared_task

from console import notifications


@shared_task(name="console.tasks.notifications_scan", ignore_result=True)
def notifications_scan() -> dict[str, int]:
    return asdict(notifications.notifications_scan())
