"""Live events: after a commit that changes what an operator sees, tell the channel layer.

Events are notifications (PostgreSQL is the record), so sending never blocks or fails the
engine: they are handed to one background event loop per process, which owns the channel
layer's connections (sending from short-lived loops breaks channels-redis' pools). In embedded
mode the web server's own loop is used, since the in-memory layer lives on that loop.

Only groups that have members get a ``group_send``, which costs several round trips and a hop
to the background loop; nobody watching is the common case for a worker. Which groups have
members is known locally (``membership``), kept current by the announcements of the Redis
layer in ``console.layers``: no Redis round trip per commit. With another Redis layer, or while
the watcher is (re)connecting, Redis is asked (one ``EXISTS`` per transaction); with a layer
that is not Redis, every group gets its message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.db import transaction

log = logging.getLogger(__name__)

RUNS_GROUP = "runs"

#: How often a membership watcher reads every group again (seconds).
RESCAN_SECONDS = 60.0

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
    """Which channel-layer groups have members. ``None`` from :meth:`listened` means "cannot
    tell": send to every group.

    With the announcing Redis layer (``console.layers``), one watcher thread per Redis host
    keeps the answer locally: it subscribes to the layer's announcement channel, then reads
    which group keys exist, then applies each announced join or leave (and reads everything
    again every :data:`RESCAN_SECONDS`, since groups also empty by expiry). While a watcher is
    not subscribed (starting, or its connection broke), that host is asked instead, one
    ``EXISTS`` per transaction, as with any other Redis layer."""

    def __init__(self) -> None:
        self._layer: Any = None
        self._pools: dict[int, Any] = {}
        #: Host index -> groups with members, for each host whose watcher is subscribed.
        self._watched: dict[int, set[str]] = {}
        self._generation = 0

    def reset(self) -> None:
        """Forget everything (a forked child: its parent's watcher threads did not come along)."""
        generation = self._generation + 1
        self.__init__()  # type: ignore[misc]
        self._generation = generation

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
            self._use(layer)
        by_host: dict[int, list[str]] = {}
        for group in groups:
            by_host.setdefault(layer.consistent_hash(group), []).append(group)
        found: set[str] = set()
        for index, names in by_host.items():
            watched = self._watched.get(index)
            if watched is not None:
                found.update(name for name in names if name in watched)
                continue
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

    def nobody(self) -> bool:
        """True when it is known locally that no group has a member: the current layer's every
        host is watched and none has a group. The common case for a worker, checked before
        any message is built."""
        from channels.layers import get_channel_layer

        layer = self._layer
        if layer is None or get_channel_layer() is not layer:
            return False
        watched = list(self._watched.values())
        return len(watched) == len(layer.hosts) and not any(watched)

    def watching(self) -> bool:
        """Whether every host of the current layer is watched (no Redis command per commit)."""
        layer = self._layer
        return layer is not None and len(self._watched) == len(layer.hosts)

    def joined(self, layer: Any, group: str) -> None:
        """``group`` of ``layer`` has a member now (said by this process's own layer)."""
        if layer is self._layer:
            watched = self._watched.get(layer.consistent_hash(group))
            if watched is not None:
                watched.add(group)

    def _use(self, layer: Any) -> None:
        self._generation += 1
        self._layer, self._pools, self._watched = layer, {}, {}
        if not getattr(layer, "announces", False):
            return
        for index in range(len(layer.hosts)):
            if self._pool(layer, index) is not None:
                threading.Thread(
                    target=self._watch, args=(layer, index, self._generation), name="live-membership", daemon=True
                ).start()

    def _watch(self, layer: Any, index: int, generation: int) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        from console.layers import announcement_channel

        prefix = layer._group_key("")
        pattern = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in prefix) + b"*"
        while self._generation == generation:
            pubsub: Any = None
            client: Any = None
            try:
                pool = self._pool(layer, index)
                # No silent reconnects: a broken connection may have lost announcements, so
                # it ends this watch (the host is asked meanwhile) and a new one starts.
                kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
                client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                pubsub.subscribe(announcement_channel(layer))
                while pubsub.get_message(timeout=1.0) is None:  # the subscription's confirmation
                    if self._generation != generation:
                        return
                # Subscribed: every change from here on arrives as an announcement.
                while self._generation == generation:
                    present = {key[len(prefix):].decode() for key in client.scan_iter(match=pattern, count=500)}
                    self._watched[index] = present
                    rescan_at = time.monotonic() + RESCAN_SECONDS
                    while time.monotonic() < rescan_at and self._generation == generation:
                        message = pubsub.get_message(timeout=1.0)
                        if message is None or message["type"] != "message":
                            continue
                        group = message["data"]
                        if client.exists(prefix + group):
                            present.add(group.decode())
                        else:
                            present.discard(group.decode())
            except Exception:
                log.debug("live membership watcher for host %s failed; asking instead", index, exc_info=True)
            finally:
                if self._generation == generation:
                    self._watched.pop(index, None)
                if pubsub is not None:
                    pubsub.close()
                if client is not None:
                    client.connection_pool.disconnect()  # this watch's own pool ends with it
            time.sleep(1.0)

    def _command(self, layer: Any, index: int, *args: Any) -> Any:
        """One command to the layer's host ``index``, on a connection borrowed from its pool and
        given back (a web server's request threads come and go: nothing is kept per thread)."""
        pool = self._pool(layer, index)
        if pool is None:
            return None
        conn = pool.get_connection()
        try:
            conn.send_command(*args)
            return conn.read_response()
        except BaseException:
            conn.disconnect()  # the pool reconnects it on next use
            raise
        finally:
            pool.release(conn)

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


membership = _Membership()
os.register_at_fork(after_in_child=membership.reset)


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
