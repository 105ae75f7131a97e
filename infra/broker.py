"""The Redis broker transport, minus three costs.

- kombu's Redis channel builds a new redis-py client for every message it publishes and every
  acknowledgement (a client's constructor fills a table of ~170 response callbacks). This
  channel keeps one client per connection pool; a redis-py client is thread-safe and takes a
  pooled connection per command. Same commands, same keys, same delivery guarantees.
- Before a task runs, kombu records its message as unacknowledged (``MULTI; ZADD; HSET;
  EXEC``) so that it can be restored if the worker dies, and waits for Redis' reply: a round
  trip between a message and its task. :class:`QoS` sends the same commands and reads the reply
  before anything else about that message (its ack, a reject, a restore) goes out.
- A message that became pointless before anybody took it can be withdrawn from its queue
  (:func:`withdraw`): the channel remembers the last messages it pushed, by task id, exactly
  as they were pushed, so an ``LREM`` finds the very one. A message already taken by a
  consumer is not in the list any more and is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

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


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS with the unacknowledged record sent without waiting for its reply.

    The record's commands go out at once, on a connection of their own, so Redis has them
    before this worker can say anything else; their reply is read (:meth:`settle`) before the
    message's ack, reject or restore, and before the next record. A failed record is logged:
    the message is then only as recoverable as a message lost in the broker, which the
    engine's reaper republishes from the database."""

    _pending: tuple[Any, Any, int] | None = None

    def append(self, message: Any, delivery_tag: str) -> None:
        self.settle()
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        commands = [
            ("MULTI",),
            ("ZADD", self.unacked_index_key, time.time(), delivery_tag),
            ("HSET", self.unacked_key, delivery_tag, record),
            ("EXEC",),
        ]
        with self.channel.conn_or_acquire() as client:
            pool = client.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except BaseException:
                conn.disconnect()
                pool.release(conn)
                raise
        self._pending = (pool, conn, len(commands))
        virtual.QoS.append(self, message, delivery_tag)

    def settle(self) -> None:
        """Read the reply of the last record sent, if not read yet."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pool, conn, replies = pending
        try:
            for _ in range(replies):
                conn.read_response()
        except Exception:
            conn.disconnect()
            log.warning("recording a message as unacknowledged failed", exc_info=True)
        finally:
            pool.release(conn)

    def ack(self, delivery_tag: str) -> None:
        self.settle()
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.settle()
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        self.settle()
        super().restore_unacked(client)

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        self.settle()
        super().restore_by_tag(tag, client=client, leftmost=leftmost)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None
    _known_connparams: dict[bool, dict[str, Any]] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Works around a kombu bug (seen with kombu 5.7.0, the Redis transport, a worker with
        # gossip or mingle on): when the broker goes away and the error surfaces first on the
        # pub/sub connection, the consumer's channel is left half closed (its close raised
        # reading its own BRPOP), `Connection.collect()` then drops the transport's client,
        # and the second close restores the unacknowledged messages through a pool rebuilt
        # from `transport.client`: None. The AttributeError ("'NoneType' object has no
        # attribute 'hostname'") is not a connection error, so it kills the worker. Rebuilt
        # from the parameters it had, the pool fails with a ConnectionError while Redis is
        # down, which Celery handles by reconnecting (the message stays recorded in Redis as
        # unacknowledged, and the engine's reaper republishes its step in any case).
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous=asynchronous)
            self._known_connparams = {**(self._known_connparams or {}), asynchronous: params}
            return params
        known = (self._known_connparams or {}).get(asynchronous)
        if known is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return dict(known)

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


class TaskPublisher:
    """Celery task messages (protocol 2, JSON) pushed straight onto their Redis queue.

    ``apply_async`` spends ~0.4 ms of CPU per message on routing, option merging, argument
    reprs, entity declaration and kombu's virtual exchange, all of which resolve to the same
    LPUSH for a plain message to a named queue on the default exchange. This builds that
    message (the exact layout kombu's Redis channel pushes, so any Celery worker consumes it)
    when nothing could make it differ: a redis:// broker without key prefix, JSON, no
    compression, no priority, no expiry, no countdown, and nobody listening to the publish
    signals. :meth:`usable` says so; otherwise the caller uses ``apply_async``."""

    def __init__(self, app: Any) -> None:
        from urllib.parse import urlparse

        from celery.utils.nodenames import anon_nodename

        conf = app.conf
        options = conf.broker_transport_options or {}
        self.app = app
        self.url = conf.broker_url
        self.ok = (
            urlparse(str(self.url)).scheme == "redis"
            and not options.get("global_keyprefix")
            and conf.task_serializer == "json"
            and not conf.task_compression
            and conf.task_protocol == 2
            and conf.task_default_priority is None
            and not conf.task_always_eager
            and not conf.task_send_sent_event
        )
        self.origin = anon_nodename()
        self._client: Any = None

    def usable(self, task: Any) -> bool:
        from celery import signals

        return (
            self.ok
            and task.expires is None
            and task.priority is None
            and not signals.before_task_publish.receivers
            and not signals.after_task_publish.receivers
        )

    def publish(self, task: Any, args: list[Any], queue: str) -> str:
        import base64
        import uuid

        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(str(self.url))
        task_id = str(uuid.uuid4())
        root_id, parent_id = task_id, None
        parent = self.app.current_worker_task
        if parent is not None:
            parent_id = parent.request.id
            root_id = parent.request.root_id or parent_id
        body = dumps(
            [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        )
        message = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task.name,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [task.time_limit, task.soft_time_limit],
                "root_id": root_id,
                "parent_id": parent_id,
                "argsrepr": repr(args),
                "kwargsrepr": "{}",
                "origin": self.origin,
                "ignore_result": bool(task.ignore_result),
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": self.app.thread_oid,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        payload = dumps(message)
        self._client.lpush(queue, payload)
        _pushed.remember(task_id, self._client, queue, payload)
        return task_id


_publishers: dict[int, TaskPublisher] = {}


def task_publisher(app: Any) -> TaskPublisher:
    publisher = _publishers.get(id(app))
    if publisher is None or publisher.app is not app or publisher.url != app.conf.broker_url:
        publisher = _publishers[id(app)] = TaskPublisher(app)
    return publisher
