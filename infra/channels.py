"""The Redis channel layer, announcing changes of group membership.

channels-redis keeps a group as a sorted set; whether anybody is in a group is whether that key
exists. This layer also publishes the group's name on the layer's announcement channel whenever
a channel joins or leaves it, so that a process sending live events can keep a local view of
which groups have members (``Membership``, below) instead of asking Redis on every commit.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, ClassVar

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer

log = logging.getLogger(__name__)

#: How often a membership watcher reads every group again (seconds).
RESCAN_SECONDS = 60.0


def announcement_channel(layer: Any) -> str:
    """The pub/sub channel on which ``layer``'s membership changes are announced."""
    return f"{layer.prefix}:group-changes"


class RedisChannelLayer(_RedisChannelLayer):
    """channels-redis' layer; joins and leaves are also announced (see the module docstring)."""

    #: The membership views of this process (its live senders'), told of every join it makes.
    memberships: ClassVar[weakref.WeakSet[Membership]] = weakref.WeakSet()

    announces = True

    async def group_add(self, group: str, channel: str) -> None:
        await super().group_add(group, channel)
        for membership in list(RedisChannelLayer.memberships):  # this process knows at once;
            membership.joined(self, group)  # others by the announcement
        await self._announce(group)

    async def group_discard(self, group: str, channel: str) -> None:
        await super().group_discard(group, channel)
        await self._announce(group)

    async def _announce(self, group: str) -> None:
        await self.connection(self.consistent_hash(group)).publish(
            announcement_channel(self), group
        )


class Membership:
    """Which channel-layer groups have members. ``None`` from :meth:`listened` means "cannot
    tell": send to every group.

    With the announcing Redis layer (``infra.channels``), one watcher thread per Redis host
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

    def close(self) -> None:
        """Stop the watchers (they end at their next wake-up) and forget what they knew."""
        generation = self._generation + 1
        self.__init__()  # type: ignore[misc]  # the same fresh state a new instance has
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
            found.update(
                name
                for name, key in zip(names, keys, strict=True)
                if self._command(layer, index, "EXISTS", key)
            )
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
                    target=self._watch,
                    args=(layer, index, self._generation),
                    name="live-membership",
                    daemon=True,
                ).start()

    def _watch(self, layer: Any, index: int, generation: int) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        prefix = layer._group_key("")
        pattern = (
            b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in prefix) + b"*"
        )
        while self._generation == generation:
            pubsub: Any = None
            client: Any = None
            try:
                pool = self._pool(layer, index)
                # No silent reconnects: a broken connection may have lost announcements, so
                # it ends this watch (the host is asked meanwhile) and a new one starts.
                kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
                client = redis.Redis(
                    connection_pool=redis.ConnectionPool(
                        connection_class=pool.connection_class, **kwargs
                    )
                )
                pubsub = client.pubsub(ignore_subscribe_messages=False)
                pubsub.subscribe(announcement_channel(layer))
                while pubsub.get_message(timeout=1.0) is None:  # the subscription's confirmation
                    if self._generation != generation:
                        return
                # Subscribed: every change from here on arrives as an announcement.
                while self._generation == generation:
                    present = {
                        key[len(prefix) :].decode()
                        for key in client.scan_iter(match=pattern, count=500)
                    }
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
                log.debug(
                    "live membership watcher for host %s failed; asking instead",
                    index,
                    exc_info=True,
                )
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
