"""The Celery app. Workers run ``celery -A console worker -Q pool.default[,pool.research]``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

app = Celery("signalbox")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["orchestration"])
