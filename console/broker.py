"""The Redis broker transport, minus one cost: kombu's Redis channel builds a new redis-py
client for every message it publishes and every acknowledgement (a client's constructor fills
a table of ~170 response callbacks). This channel keeps one client per connection pool; a
redis-py client is thread-safe and takes a pooled connection per command, so nothing else
changes: same commands, same keys, same delivery guarantees."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared


class Transport(kombu_redis.Transport):
    Channel = Channel
