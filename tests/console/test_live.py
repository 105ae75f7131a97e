"""Live events through the Redis channel layer: members of a run's group (and of the run list)
get one message per transaction; groups nobody is in cost a single Redis command."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings as django_settings

from orchestration import live, runtime


def _sender() -> live.LiveSender:
    return runtime.current().live


@pytest.fixture
def redis_layer(settings: Any) -> Any:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "infra.channels.RedisChannelLayer",
            "CONFIG": {
                "hosts": [django_settings.REDIS_URL],
                "prefix": f"live-test-{secrets.token_hex(4)}",
            },
        }
    }
    settings.SIGNALBOX = {**settings.SIGNALBOX, "LIVE_EVENTS": True}
    return get_channel_layer()


def _receive(layer: Any, channel: str) -> dict[str, Any]:
    async def receive() -> dict[str, Any]:
        return await asyncio.wait_for(layer.receive(channel), timeout=5)

    return async_to_sync(receive)()


def _events(run_id: int, *, run_level: bool = False) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {
            "run_id": run_id,
            "kind": "step",
            "change": "succeeded",
            "step_id": 1,
            "key": "a",
            "status": "succeeded",
        },
        {
            "run_id": run_id,
            "kind": "step",
            "change": "created",
            "step_id": 2,
            "key": "b",
            "status": "running",
        },
    ]
    if run_level:
        events.append(
            {"run_id": run_id, "kind": "run", "change": "succeeded", "status": "succeeded"}
        )
    return events


def test_members_of_the_run_group_receive_one_message_per_transaction(redis_layer: Any) -> None:
    channel = async_to_sync(redis_layer.new_channel)()
    async_to_sync(redis_layer.group_add)(live.run_group(7), channel)

    _sender().send(_events(7) + _events(8))  # nobody watches run 8

    message = _receive(redis_layer, channel)
    assert message["type"] == "run.event"
    assert [e["step_id"] for e in message["events"]] == [1, 2]
    assert all(e["run_id"] == 7 for e in message["events"])


def test_run_list_members_hear_only_run_level_changes(redis_layer: Any) -> None:
    channel = async_to_sync(redis_layer.new_channel)()
    async_to_sync(redis_layer.group_add)(live.RUNS_GROUP, channel)

    _sender().send(_events(9))  # step-level only: not for the list
    _sender().send(_events(10, run_level=True))

    message = _receive(redis_layer, channel)
    assert message["event"] == {
        "run_id": 10,
        "kind": "run",
        "change": "succeeded",
        "status": "succeeded",
    }


@pytest.mark.django_db(transaction=True)
def test_a_submitted_run_is_news_for_the_run_list_and_home(redis_layer: Any) -> None:
    from orchestration.services import run_submit

    channel = async_to_sync(redis_layer.new_channel)()
    async_to_sync(redis_layer.group_add)(live.RUNS_GROUP, channel)

    run = run_submit(workflow="reference_workload", input={}).run

    message = _receive(redis_layer, channel)
    assert message["event"] == {
        "run_id": run.pk,
        "kind": "run",
        "change": "queued",
        "status": "queued",
    }


def test_groups_without_members_send_nothing(
    redis_layer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[Any] = []
    monkeypatch.setattr(
        live.asyncio, "run_coroutine_threadsafe", lambda coro, loop: sent.append(coro.close())
    )

    _sender().send(_events(11, run_level=True))
    assert sent == []

    channel = async_to_sync(redis_layer.new_channel)()
    async_to_sync(redis_layer.group_add)(live.run_group(11), channel)
    _sender().send(_events(11))
    assert len(sent) == 1


def test_events_still_go_out_when_membership_cannot_be_asked(
    redis_layer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(groups: list[str]) -> set[str]:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(_sender().membership, "listened", broken)
    channel = async_to_sync(redis_layer.new_channel)()
    async_to_sync(redis_layer.group_add)(live.run_group(12), channel)

    _sender().send(_events(12))

    assert _receive(redis_layer, channel)["events"][0]["run_id"] == 12


_OTHER_PROCESS = """
import asyncio, sys
from infra.channels import RedisChannelLayer

async def main(url, prefix, action, group, channel):
    layer = RedisChannelLayer(hosts=[url], prefix=prefix)
    await getattr(layer, action)(group, channel)

asyncio.run(main(*sys.argv[1:]))
"""


def _in_other_process(layer: Any, action: str, group: str, channel: str) -> None:
    import subprocess
    import sys

    subprocess.run(
        [
            sys.executable,
            "-c",
            _OTHER_PROCESS,
            django_settings.REDIS_URL,
            layer.prefix,
            action,
            group,
            channel,
        ],
        check=True,
        timeout=30,
    )


def _eventually(predicate: Any, timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_joins_and_leaves_in_another_process_are_known_without_asking_redis(
    redis_layer: Any,
) -> None:
    group = live.run_group(21)
    assert _sender().membership.listened([group]) == set()
    assert _eventually(_sender().membership.watching), "the membership watcher never subscribed"

    channel = async_to_sync(redis_layer.new_channel)()
    _in_other_process(redis_layer, "group_add", group, channel)
    assert _eventually(
        lambda: _sender().membership.listened([group, live.run_group(22)]) == {group}
    )

    _in_other_process(redis_layer, "group_discard", group, channel)
    assert _eventually(lambda: _sender().membership.listened([group]) == set())
    assert _sender().membership.watching()


def test_a_broken_watcher_connection_falls_back_to_asking_then_reconnects(redis_layer: Any) -> None:
    import redis

    _sender().membership.listened(["runs"])
    assert _eventually(_sender().membership.watching)
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    client.client_kill_filter(_type="pubsub")
    assert _eventually(lambda: not _sender().membership.watching(), timeout=3)

    # Meanwhile a join elsewhere is still seen: the host is asked.
    channel = async_to_sync(redis_layer.new_channel)()
    _in_other_process(redis_layer, "group_add", live.run_group(23), channel)
    assert _sender().membership.listened([live.run_group(23)]) == {live.run_group(23)}
    assert _eventually(_sender().membership.watching, timeout=5)
    assert _sender().membership.listened([live.run_group(23)]) == {live.run_group(23)}


def test_when_no_group_has_a_member_nothing_is_built_or_sent_until_someone_joins(
    redis_layer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sender().membership.listened(["runs"])
    assert _eventually(_sender().membership.watching)
    assert _sender().membership.nobody()
    built: list[Any] = []
    monkeypatch.setattr(live, "messages_for", lambda events: built.append(events) or [])
    _sender().send(_events(31, run_level=True))
    assert built == []  # known locally: no message is even built

    channel = async_to_sync(redis_layer.new_channel)()
    _in_other_process(redis_layer, "group_add", live.run_group(31), channel)
    assert _eventually(lambda: not _sender().membership.nobody())
    monkeypatch.undo()
    _sender().send(_events(31))
    assert _receive(redis_layer, channel)["events"][0]["run_id"] == 31
