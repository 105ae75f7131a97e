"""Live events: after a commit that changes what an operator sees, tell the channel layer.

Events are notifications (PostgreSQL is the record), so sending never blocks or fails the
engine: they are handed to one background event loop per process, which owns the channel
layer's connections (sending from short-lived loops breaks channels-redis' pools). In embedded
mode the web server's own loop is used, since the in-memory layer lives on that loop.

With the Redis channel layer, the sender first asks Redis (one synchronous command) whether
anybody is in the groups at all: a group without members is a key that does not exist. Only
groups that have members get a ``group_send``, which costs several round trips and a hop to
the background loop. Nobody watching is the common case for a worker.
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
        message = {"type": "run.event", "event": (run_level or run_events)[-1], "events": run_events}
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


class _Membership:
    """Whether channel-layer groups have members, asked synchronously of the Redis layer's own
    server(s). ``None`` from :meth:`listened` means "cannot tell": send to every group."""

    def __init__(self) -> None:
        self._layer: Any = None
        self._pools: dict[int, Any] = {}
        self._local = threading.local()

    def listened(self, groups: list[str]) -> set[str] | None:
        from channels.layers import get_channel_layer

        try:
            from channels_redis.core import RedisChannelLayer
        except ImportError:  # pragma: no cover - channels-redis is a dependency
            return None
        layer = get_channel_layer()
        if not isinstance(layer, RedisChannelLayer):
            return None
        if layer is not self._layer:
            self._layer, self._pools, self._local = layer, {}, threading.local()
        by_host: dict[int, list[str]] = {}
        for group in groups:
            by_host.setdefault(layer.consistent_hash(group), []).append(group)
        found: set[str] = set()
        for index, names in by_host.items():
            keys = [layer._group_key(name) for name in names]
            # A group whose last member left (or expired) is a key that no longer exists.
            present = self._command(layer, index, "EXISTS", *keys)
            if present is None:
                return None
            if not present:
                continue
            if present == len(keys):
                found.update(names)
                continue
            found.update(name for name, key in zip(names, keys, strict=True) if self._command(layer, index, "EXISTS", key))
        return found

    def _command(self, layer: Any, index: int, *args: Any) -> Any:
        """One command on this thread's own connection to the layer's host ``index`` (a bare
        connection: redis-py's client machinery costs more than the round trip here)."""
        connections = self._local.__dict__.setdefault("connections", {})
        conn = connections.get(index)
        if conn is None:
            pool = self._pool(layer, index)
            if pool is None:
                return None
            conn = connections[index] = pool.make_connection()
        try:
            conn.send_command(*args)
            return conn.read_response()
        except BaseException:
            conn.disconnect()  # reconnects on next use
            raise

    def _pool(self, layer: Any, index: int) -> Any:
        if index not in self._pools:
            import redis

            host = dict(layer.hosts[index])
            if "address" in host:
                self._pools[index] = redis.ConnectionPool.from_url(host.pop("address"), **host)
            elif "master_name" in host or "sentinels" in host:
                self._pools[index] = None  # sentinel-managed: leave it to the layer
            else:
                self._pools[index] = redis.ConnectionPool(**host)
        return self._pools[index]


_membership = _Membership()


def send_now(events: list[dict[str, Any]]) -> None:
    if not events or not settings.SIGNALBOX["LIVE_EVENTS"]:
        return
    messages = messages_for(events)
    try:
        listened = _membership.listened([group for group, _ in messages])
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
