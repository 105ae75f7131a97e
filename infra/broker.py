"""The Redis broker transport: kombu's, with one workaround, and the engine's task publisher.

- :class:`Channel` is kombu's Redis channel, except that it can rebuild its connection pool
  after its connection was closed (a kombu bug killed workers when Redis went away; see
  :meth:`Channel._connparams`).
- :class:`TaskPublisher` pushes the engine's wake-up messages straight onto their Redis queue,
  in the exact layout ``apply_async`` would push (pinned by tests/console/test_broker.py).

Three other replacements of kombu's own mechanisms lived here (a redis client shared by a
channel instead of one per publish and ack; kombu's unacknowledged record sent without waiting
for its reply; the withdrawal of a pushed message): measured interleaved against kombu's own,
none bought anything on the engine's throughput or latency (docs/benchmarks.md, "Library
mechanisms replaced for speed"), so kombu's are used again.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps


class Channel(kombu_redis.Channel):
    _known_connparams: dict[bool, dict[str, Any]] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Works around a kombu bug (kombu 5.7.0, the Redis transport, a worker with gossip or
        # mingle on, as `celery worker` starts by default): when the broker goes away and the
        # error surfaces first on the pub/sub connection, the consumer's channel is left half
        # closed (its close raised reading its own BRPOP), closing another channel fails on the
        # dead broker, `Connection.collect()` then drops the transport's client, and the next
        # close of the first channel restores its unacknowledged messages through a pool
        # rebuilt from `transport.client`: None. The AttributeError ("'NoneType' object has no
        # attribute 'hostname'") is not a connection error, so it killed the worker. Rebuilt
        # from the parameters it had, the pool fails with a ConnectionError while Redis is
        # down, which Celery handles by reconnecting (the message stays recorded in Redis as
        # unacknowledged, and the engine's reaper republishes its step in any case). Replayed
        # by tests/infra/test_broker_outage.py.
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous=asynchronous)
            self._known_connparams = {**(self._known_connparams or {}), asynchronous: params}
            return params
        known = (self._known_connparams or {}).get(asynchronous)
        if known is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return dict(known)


class Transport(kombu_redis.Transport):
    Channel = Channel


class TaskPublisher:
    """Celery task messages (protocol 2, JSON) pushed straight onto their Redis queue.

    ``apply_async`` spends ~0.35 ms more CPU per message (0.51 ms against 0.17 measured by
    tests/bench/micro.py) on routing, option merging, argument reprs, entity declaration and
    kombu's virtual exchange, all of which resolve to the same LPUSH for a plain message to a
    named queue on the default exchange: ~1 ms of the web process's CPU per REST submit. This builds that
    message (the exact layout kombu's Redis channel pushes, so any Celery worker consumes it)
    when nothing could make it differ: a redis:// broker without key prefix, JSON, no
    compression, no priority, no declared queues, no expiry, no countdown, and nobody listening
    to the publish signals. :meth:`usable` says so; otherwise the caller uses ``apply_async``."""

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
            and not conf.task_inherit_parent_priority
            and conf.task_queues is None  # declared queues may route to their own exchange
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
        self._client.lpush(queue, dumps(message))
        return task_id


_publishers: dict[int, TaskPublisher] = {}


def task_publisher(app: Any) -> TaskPublisher:
    publisher = _publishers.get(id(app))
    if publisher is None or publisher.app is not app or publisher.url != app.conf.broker_url:
        publisher = _publishers[id(app)] = TaskPublisher(app)
    return publisher
