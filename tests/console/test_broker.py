"""The broker transport: kombu's Redis transport, publishing through one reused client."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from kombu import Connection

from console.celery import app
from infra.broker import Channel, QoS, Transport


def test_redis_urls_use_the_transport_and_publishing_reuses_one_client() -> None:
    # tests/console run the app on memory://, so the test broker's URL is given here.
    with Connection(settings.REDIS_URL) as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        queue = "pool.test-broker"
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        channel.client.delete(queue)
        producer = conn.Producer(channel)
        producer.publish({"n": 1}, routing_key=queue, declare=[], exchange="")
        producer.publish({"n": 2}, routing_key=queue, declare=[], exchange="")
        assert channel.client.llen(queue) == 2
        channel.client.delete(queue)


def test_other_schemes_keep_their_transport() -> None:
    assert not isinstance(Connection("memory://").transport, Transport)
    assert app.conf.broker_url == "memory://"  # tests/console's own broker


def test_a_waiting_message_can_be_withdrawn_once_and_a_taken_one_is_left_alone() -> None:
    from infra.broker import withdraw

    with Connection(settings.REDIS_URL) as conn:
        channel = conn.default_channel
        queue = "pool.test-withdraw"
        channel.client.delete(queue)
        producer = conn.Producer(channel)
        for task_id in ("t-1", "t-2", "t-3"):
            producer.publish({"task": task_id}, routing_key=queue, declare=[], exchange="", headers={"id": task_id})

        assert withdraw("t-2") is True
        assert withdraw("t-2") is False  # already withdrawn
        assert withdraw("unknown") is False
        assert channel.client.llen(queue) == 2
        channel.client.rpop(queue)  # a consumer takes t-1 (the oldest)
        assert withdraw("t-1") is False
        assert channel.client.llen(queue) == 1
        channel.client.delete(queue)


def test_a_fast_published_task_message_is_the_one_celery_would_push(monkeypatch: Any) -> None:
    import base64
    import json

    import redis

    from infra.broker import task_publisher
    from orchestration.tasks import step_execute

    monkeypatch.setitem(app.conf, "broker_url", settings.REDIS_URL)
    task = step_execute._get_current_object()
    publisher = task_publisher(app)
    assert publisher.usable(task)
    client = redis.Redis.from_url(settings.REDIS_URL)
    queue = "pool.test-fast"
    client.delete(queue)

    fast_id = publisher.publish(task, [41], queue)
    # Celery's own path, from a separate app on the same settings (this one's producer pool
    # must stay on the tests' memory broker).
    from celery import Celery

    other = Celery("signalbox")
    other.config_from_object("django.conf:settings", namespace="CELERY")
    other.conf.broker_url = settings.REDIS_URL
    try:
        other.send_task(task.name, args=[42], queue=queue, ignore_result=task.ignore_result)
    finally:
        other.close()

    pushed = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
    celery_msg, fast_msg = pushed  # LPUSH: the newest first
    assert fast_msg["headers"]["id"] == fast_id
    for message in (celery_msg, fast_msg):
        # Unique per message (ids, the argument) or per app (reply_to): the rest is identical.
        message["headers"].update(id=None, root_id=None, argsrepr=None)
        message["properties"].update(correlation_id=None, delivery_tag=None, reply_to=None)
        message["body"] = json.loads(base64.b64decode(message["body"]))[1:]  # kwargs, embed
    assert fast_msg == celery_msg


def test_the_fast_path_steps_aside_when_it_could_differ(monkeypatch: Any) -> None:
    from celery import signals

    from infra.broker import task_publisher
    from orchestration.tasks import step_execute

    task = step_execute._get_current_object()
    assert not task_publisher(app).usable(task)  # memory:// here
    monkeypatch.setitem(app.conf, "broker_url", settings.REDIS_URL)
    assert task_publisher(app).usable(task)

    def listener(**kwargs: Any) -> None:
        pass

    signals.before_task_publish.connect(listener)
    try:
        assert not task_publisher(app).usable(task)
    finally:
        signals.before_task_publish.disconnect(listener)


def test_a_delivered_message_is_recorded_unacknowledged_until_its_ack_and_can_be_restored() -> None:
    from kombu import Consumer, Queue

    with Connection(settings.REDIS_URL) as conn:
        channel = conn.default_channel
        queue = "pool.test-unacked"
        client = channel.client
        client.delete(queue, channel.unacked_key, channel.unacked_index_key)
        producer = conn.Producer(channel)
        producer.publish({"n": 1}, routing_key=queue, declare=[], exchange="")
        received: list[Any] = []
        consumer = Consumer(channel, [Queue(queue, no_declare=True)], callbacks=[lambda body, msg: received.append(msg)])
        consumer.consume()
        conn.drain_events(timeout=5)
        (message,) = received
        assert isinstance(channel.qos, QoS)
        # The record was sent without waiting; its reply is read before anything else about
        # the message, here explicitly.
        channel.qos.settle()
        tag = message.delivery_tag
        assert client.hexists(channel.unacked_key, tag)
        assert client.zscore(channel.unacked_index_key, tag) is not None
        message.ack()
        assert not client.hexists(channel.unacked_key, tag)
        assert client.zscore(channel.unacked_index_key, tag) is None

        # A worker that stops without acking puts its message back in the queue.
        producer.publish({"n": 2}, routing_key=queue, declare=[], exchange="")
        conn.drain_events(timeout=5)
        assert len(received) == 2 and client.llen(queue) == 0
        channel.qos.restore_unacked()
        assert client.llen(queue) == 1
        assert not client.hexists(channel.unacked_key, received[1].delivery_tag)
        consumer.cancel()
        client.delete(queue, channel.unacked_key, channel.unacked_index_key)
