"""Gunicorn settings for the Signalbox ASGI web process.

    gunicorn -c deploy/gunicorn.conf.py console.asgi:application

Configured from the environment: ``PORT`` (default 8000), ``WEB_CONCURRENCY`` (worker
processes, default 2), ``GUNICORN_TIMEOUT`` (seconds, default 30), ``FORWARDED_ALLOW_IPS``
(proxies trusted for X-Forwarded-* headers, default 127.0.0.1), ``LOG_LEVEL``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

# uvicorn[standard] gives the worker websockets support; plain uvicorn lacks it.
worker_class = "uvicorn_worker.UvicornWorker"
bind = f"0.0.0.0:{int(os.environ.get('PORT', '8000'))}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))

# Import the application in each worker, after the fork: a database pool or a telemetry exporter
# opened before the fork would be shared by every worker process.
preload_app = False

timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
# Websockets are long-lived: give them time to close cleanly on a deploy.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")

# Heartbeat files on a memory filesystem: a container's disk can stall them (and it may be
# read-only).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# gunicorn >= 25.1 opens a control socket under $HOME by default; the image's home is read-only.
# Set GUNICORN_CONTROL_SOCKET to a writable path to use `gunicornc`.
_control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET", "")
if _control_socket:
    control_socket = _control_socket
control_socket_disable = not _control_socket

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()


def post_fork(server: Any, worker: Any) -> None:
    """Start telemetry in each worker process, if this build of Signalbox has it."""
    try:
        spec = importlib.util.find_spec("console.telemetry")
    except ImportError:
        spec = None
    if spec is None:
        return
    importlib.import_module("console.telemetry").start()
