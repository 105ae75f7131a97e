"""The broker transport: kombu's Redis transport, publishing through one reused client."""

from __future__ import annotations

from django.conf import settings
from kombu import Connection

from console.broker import Channel, Transport
from console.celery import app


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
    from console.broker import withdraw

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
