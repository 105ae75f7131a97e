"""Live events: after a commit that changes what an operator sees, tell the channel layer.

Events are notifications (PostgreSQL is the record), so sending never blocks or fails the
engine: they are handed to one background event loop per process, which owns the channel
layer's connections (sending from short-lived loops breaks channels-redis' pools). In embedded
mode the web server's own loop is used, since the in-memory layer lives on that loop.

Only groups that have members get a ``group_send``, which costs several round trips and a hop
to the background loop; nobody watching is the common case for a worker. Which groups have
members is known locally (``membership``), kept current by the announcements of the Redis
layer in ``infra.channels``: no Redis round trip per commit. With another Redis layer, or while
the watcher is (re)connecting, Redis is asked (one ``EXISTS`` per transaction); with a layer
that is not Redis, every group gets its message.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from django.conf import settings
from django.db import transaction

from infra.channels import membership

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


def messages_for(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(group, message) pairs: one message per run per transaction (a page re-renders once, not
    once per change), and one to the run list only when a run's own status changed."""
    by_run: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        by_run.setdefault(event["run_id"], []).append(event)
    out: list[tuple[str, dict[str, Any]]] = []
    for run_id, run_events in by_run.items():
        run_level = [e for e in run_events if e.get("kind") == "run"]
        # "event" is the most telling change (a run-level one if any); "events" has them all.
        message = {
            "type": "run.event",
            "event": (run_level or run_events)[-1],
            "events": run_events,
        }
        out.append((run_group(run_id), message))
        if run_level:
            out.append((RUNS_GROUP, message))
    return out


async def _send(messages: list[tuple[str, dict[str, Any]]]) -> None:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        return
    for group, message in messages:
        try:
            await layer.group_send(group, message)
        except Exception:  # a dropped notification must never break the engine
            log.warning("live event not sent", exc_info=True)


def send_now(events: list[dict[str, Any]]) -> None:
    if not events or not settings.SIGNALBOX["LIVE_EVENTS"] or membership.nobody():
        return
    messages = messages_for(events)
    try:
        listened = membership.listened([group for group, _ in messages])
    except Exception:  # Redis unreachable: let the layer try (and log) as it always did
        log.debug("live event membership check failed", exc_info=True)
        listened = None
    if listened is not None:
        messages = [(group, message) for group, message in messages if group in listened]
        if not messages:
            return
    asyncio.run_coroutine_threadsafe(_send(messages), _ensure_loop())


def send_on_commit(events: list[dict[str, Any]]) -> None:
    """Queue ``events`` to go out once the current transaction commits (never before)."""
    if events and settings.SIGNALBOX["LIVE_EVENTS"]:
        transaction.on_commit(lambda: send_now(events))
