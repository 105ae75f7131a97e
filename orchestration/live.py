"""Live events: after a commit that changes what an operator sees, tell the channel layer.

Events are notifications (PostgreSQL is the record), so sending never blocks or fails the
engine: they are handed to one background event loop per process, which owns the channel
layer's connections (sending from short-lived loops breaks channels-redis' pools). In embedded
mode the web server's own loop is used, since the in-memory layer lives on that loop.

Only groups that have members get a ``group_send``, which costs several round trips and a hop
to the background loop; nobody watching is the common case for a worker. Which groups have
members is known locally (``infra.channels.Membership``), kept current by the announcements of
the Redis layer: no Redis round trip per commit. With another Redis layer, or while the watcher
is (re)connecting, Redis is asked (one ``EXISTS`` per transaction); with a layer that is not
Redis, every group gets its message.

A process's :class:`LiveSender` is owned by its runtime (``orchestration.runtime``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from django.conf import settings

from infra.channels import Membership, RedisChannelLayer

log = logging.getLogger(__name__)

RUNS_GROUP = "runs"
#: The inbox's group: changes that matter to it without changing a run's status (claims).
INBOX_GROUP = "inbox"


def run_group(run_id: int) -> str:
    return f"run-{run_id}"


def _inbox_change(event: dict[str, Any]) -> bool:
    """A change the inbox shows that may leave the run's status alone: a claim, or a step that
    started waiting (an approval or escalation opened beside another one)."""
    kind = event.get("kind")
    return kind == "claim" or (kind == "step" and event.get("status") == "waiting")


def messages_for(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(group, message) pairs: one message per run per transaction (a page re-renders once, not
    once per change), one to the run list only when a run's own status changed, and one to the
    inbox when an item opened or its claim changed."""
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
        if any(_inbox_change(e) for e in run_events):
            out.append((INBOX_GROUP, message))
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


class LiveSender:
    """One process's sender of live events: its event loop and its view of group membership."""

    def __init__(self) -> None:
        self.membership = Membership()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop = False
        self._lock = threading.Lock()
        RedisChannelLayer.memberships.add(self.membership)

    def use_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send on ``loop`` (the ASGI server's loop in embedded mode)."""
        self._loop, self._own_loop = loop, False

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="live-events", daemon=True).start()
                self._loop, self._own_loop = loop, True
            return self._loop

    def send(self, events: list[dict[str, Any]]) -> None:
        """Send ``events`` (already committed) to the groups that have members; never raises."""
        if not events or not settings.SIGNALBOX["LIVE_EVENTS"] or self.membership.nobody():
            return
        messages = messages_for(events)
        try:
            listened = self.membership.listened([group for group, _ in messages])
        except Exception:  # Redis unreachable: let the layer try (and log) as it always did
            log.debug("live event membership check failed", exc_info=True)
            listened = None
        if listened is not None:
            messages = [(group, message) for group, message in messages if group in listened]
            if not messages:
                return
        try:
            asyncio.run_coroutine_threadsafe(_send(messages), self._ensure_loop())
        except Exception:
            log.warning("live events not handed to the event loop", exc_info=True)

    def close(self) -> None:
        self.membership.close()
        RedisChannelLayer.memberships.discard(self.membership)
        loop, self._loop = self._loop, None
        if loop is not None and self._own_loop and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
