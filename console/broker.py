"""The Redis broker transport, minus two costs.

- kombu's Redis channel builds a new redis-py client for every message it publishes and every
  acknowledgement (a client's constructor fills a table of ~170 response callbacks). This
  channel keeps one client per connection pool; a redis-py client is thread-safe and takes a
  pooled connection per command. Same commands, same keys, same delivery guarantees.
- A message that became pointless before anybody took it can be withdrawn from its queue
  (:func:`withdraw`): the channel remembers the last messages it pushed, by task id, exactly
  as they were pushed, so an ``LREM`` finds the very one. A message already taken by a
  consumer is not in the list any more and is left alone.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

#: How many recently pushed messages can still be withdrawn, per process.
REMEMBERED = 1024


class _Pushed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_task: OrderedDict[str, tuple[Any, str, str]] = OrderedDict()

    def remember(self, task_id: str, client: Any, key: str, payload: str) -> None:
        with self._lock:
            self._by_task[task_id] = (client, key, payload)
            while len(self._by_task) > REMEMBERED:
                self._by_task.popitem(last=False)

    def take(self, task_id: str) -> tuple[Any, str, str] | None:
        with self._lock:
            return self._by_task.pop(task_id, None)


_pushed = _Pushed()


def withdraw(task_id: str) -> bool:
    """Remove the message of ``task_id`` from its queue if it is still waiting there; ``True``
    if it was. Only for messages whose purpose is gone (the work was done another way)."""
    pushed = _pushed.take(task_id)
    if pushed is None:
        return False
    client, key, payload = pushed
    return bool(client.lrem(key, 1, payload))


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

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if kwargs.get("_publish_batch") is not None or (self._expires and queue in self._expires):
            super()._put(queue, message, **kwargs)
            return
        # kombu's own path for a plain message, keeping what was pushed.
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        payload = dumps(message)
        with self.conn_or_acquire() as client:
            client.lpush(key, payload)
        task_id = (message.get("headers") or {}).get("id")
        if task_id:
            _pushed.remember(task_id, client, key, payload)


class Transport(kombu_redis.Transport):
    Channel = Channel
