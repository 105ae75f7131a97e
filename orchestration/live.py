"""Live events: after a commit that changes what an operator sees, tell the channel layer.

Events are notifications (PostgreSQL is the record), so sending never blocks or fails the
engine: they are handed to one background event loop per process, which owns the channel
layer's connections (sending from short-lived loops breaks channels-redis' pools). In embedded
mode the web server's own loop is used, since the in-memory layer lives on that loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

RUNS_GROUP = "runs"

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def use_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Send on ``loop`` (the ASGI server's loop in embedded mode)."""
    global _loop
    _loop = loop


def _ensure_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="live-events", daemon=True).start()
            _loop = loop
        return _loop


async def _send(events: list[dict[str, Any]]) -> None:
    """One message per run per transaction (a page re-renders once, not once per change), and
    one to the run list only when a run's own status changed."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    by_run: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        by_run.setdefault(event["run_id"], []).append(event)
    for run_id, run_events in by_run.items():
        run_level = [e for e in run_events if e.get("kind") == "run"]
        # "event" is the most telling change (a run-level one if any); "events" has them all.
        message = {"type": "run.event", "event": (run_level or run_events)[-1], "events": run_events}
        try:
            await layer.group_send(run_group(run_id), message)
            if run_level:
                await layer.group_send(RUNS_GROUP, message)
        except Exception:  # a dropped notification must never break the engine
            log.warning("live event not sent", exc_info=True)


def send_now(events: list[dict[str, Any]]) -> None:
    if not events or not settings.SIGNALBOX["LIVE_EVENTS"]:
        return
    asyncio.run_coroutine_threadsafe(_send(events), _ensure_loop())


def send_on_commit(events: list[dict[str, Any]]) -> None:
    """Queue ``events`` to go out once the current transaction commits (never before)."""
    if events and settings.SIGNALBOX["LIVE_EVENTS"]:
        transaction.on_commit(lambda: send_now(events))
