"""The broker transport (kombu's Redis transport with one workaround) and the engine's task
publisher, pinned against Celery: the message it pushes is the message ``apply_async`` pushes
with the installed Celery and kombu, so an upgrade that changes Celery's message fails here."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from kombu import Connection

from console.celery import app
from infra.broker import Channel, Transport, task_publisher
from orchestration.tasks import step_execute

QUEUE = "pool.test-publisher"


def test_redis_urls_use_the_transport_and_other_schemes_keep_theirs() -> None:
    # tests/console run the app on memory://, so the test broker's URL is given here.
    with Connection(settings.REDIS_URL) as conn:
        assert isinstance(conn.transport, Transport)
        assert isinstance(conn.default_channel, Channel)
    assert not isinstance(Connection("memory://").transport, Transport)
    assert app.conf.broker_url == "memory://"  # tests/console's own broker


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE, f"_kombu.binding.{QUEUE}", f"_kombu.binding_permanent.{QUEUE}")


@pytest.fixture
def on_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The publisher on the test Redis (tests/console's app is on memory://)."""
    monkeypatch.setitem(app.conf, "broker_url", settings.REDIS_URL)


def pushed_by_both(client: redis.Redis, args: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The message TaskPublisher pushes and the one ``apply_async`` pushes, for the same task,
    arguments and queue, from the same app and thread."""
    task = step_execute._get_current_object()
    publisher = task_publisher(app)
    assert publisher.usable(task)
    ours_id = publisher.publish(task, args, QUEUE)
    with Connection(settings.REDIS_URL) as conn:
        celery_id = task.apply_async(args=args, queue=QUEUE, connection=conn).id
    celery_raw, ours_raw = client.lrange(QUEUE, 0, -1)  # LPUSH: the newest first
    ours, celery = json.loads(ours_raw), json.loads(celery_raw)
    assert ours["headers"]["id"] == ours_id and celery["headers"]["id"] == celery_id
    return ours, celery


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its unique ids blanked: each message's own id (also its correlation id,
    and its root id when it has no parent) and kombu's delivery tag."""
    message = json.loads(json.dumps(message))
    own_id = message["headers"]["id"]
    message["headers"]["id"] = message["properties"]["correlation_id"] = "<id>"
    if message["headers"]["root_id"] == own_id:
        message["headers"]["root_id"] = "<id>"
    message["properties"]["delivery_tag"] = "<tag>"
    return message


def test_a_published_message_is_the_one_apply_async_pushes(
    on_redis: None, client: redis.Redis
) -> None:
    ours, celery = pushed_by_both(client, [41])
    assert without_ids(ours) == without_ids(celery)
    # Decoded too: the body is base64 of JSON, where key order could hide a difference.
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(
        base64.b64decode(celery["body"])
    )


def test_a_message_published_from_a_running_task_names_it_as_apply_async_does(
    on_redis: None, client: redis.Redis
) -> None:
    from celery._state import _task_stack

    parent = step_execute._get_current_object()
    parent.push_request(id="parent-task", root_id="root-task", called_directly=False)
    _task_stack.push(parent)
    try:
        ours, celery = pushed_by_both(client, [43])
    finally:
        _task_stack.pop()
        parent.pop_request()
    assert (
        ours["headers"]["parent_id"] == "parent-task" and ours["headers"]["root_id"] == "root-task"
    )
    assert without_ids(ours) == without_ids(celery)


@pytest.mark.parametrize(
    "setting, value",
    [
        ("task_serializer", "pickle"),
        ("task_compression", "gzip"),
        ("task_default_priority", 5),
        ("task_inherit_parent_priority", True),
        ("task_queues", []),
        ("task_always_eager", True),
        ("task_send_sent_event", True),
        ("broker_transport_options", {"global_keyprefix": "sbx:"}),
    ],
)
def test_the_publisher_steps_aside_when_celery_would_push_something_else(
    on_redis: None, monkeypatch: pytest.MonkeyPatch, setting: str, value: Any
) -> None:
    task = step_execute._get_current_object()
    assert task_publisher(app).usable(task)
    monkeypatch.setitem(app.conf, setting, value)
    monkeypatch.setitem(app.conf, "broker_url", settings.REDIS_URL + "?changed")  # a new publisher
    assert not task_publisher(app).usable(task)


def test_the_publisher_steps_aside_for_other_brokers_and_publish_signals(
    on_redis: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import signals

    task = step_execute._get_current_object()
    assert task_publisher(app).usable(task)

    def listener(**kwargs: Any) -> None:
        pass

    signals.before_task_publish.connect(listener)
    try:
        assert not task_publisher(app).usable(task)
    finally:
        signals.before_task_publish.disconnect(listener)
    monkeypatch.setitem(app.conf, "broker_url", "memory://")
    assert not task_publisher(app).usable(task)
