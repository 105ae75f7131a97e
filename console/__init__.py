"""Signalbox project package: settings, URLs, ASGI, the Celery app and the operator UI."""

from console.celery import app as celery_app

__all__ = ["celery_app"]
