"""The Celery app. Workers run ``celery -A console worker -Q pool.default[,pool.research]``."""

import os

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")

# redis:// and rediss:// URLs use kombu's Redis transport with a workaround that keeps a worker
# alive through a broker outage (infra/broker.py); other schemes (memory:// in embedded mode and
# tests) are untouched.
TRANSPORT_ALIASES.update({"redis": "infra.broker:Transport", "rediss": "infra.broker:Transport"})

app = Celery("signalbox")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["orchestration"])
app.autodiscover_tasks(["console"])
