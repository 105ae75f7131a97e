"""The Redis channel layer, announcing changes of group membership.

channels-redis keeps a group as a sorted set; whether anybody is in a group is whether that key
exists. This layer also publishes the group's name on the layer's announcement channel whenever
a channel joins or leaves it, so that a process sending live events can keep a local view of
which groups have members (``orchestration.live``) instead of asking Redis on every commit.
"""

from __future__ import annotations

from typing import Any

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer


def announcement_channel(layer: Any) -> str:
    """The pub/sub channel on which ``layer``'s membership changes are announced."""
    return f"{layer.prefix}:group-changes"


class RedisChannelLayer(_RedisChannelLayer):
    """channels-redis' layer; joins and leaves are also announced (see the module docstring)."""

    announces = True

    async def group_add(self, group: str, channel: str) -> None:
        await super().group_add(group, channel)
        from orchestration.live import membership

        membership.joined(self, group)  # this process knows at once; others by the announcement
        await self._announce(group)

    async def group_discard(self, group: str, channel: str) -> None:
        await super().group_discard(group, channel)
        await self._announce(group)

    async def _announce(self, group: str) -> None:
        await self.connection(self.consistent_hash(group)).publish(announcement_channel(self), group)
