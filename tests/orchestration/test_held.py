"""Held wake-up messages (orchestration.held): a step a worker handed off waits a moment for
that worker to take it itself, then goes to the broker. The broker is the edge here: the
publisher is a list."""

from __future__ import annotations

import threading
import time

import pytest

from orchestration.held import HeldMessages
from tests.conftest import wait_until


class Broker:
    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[tuple[int, str, float]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, steps: list[tuple[int, str, float]]) -> None:
        with self.lock:
            if self.fail_first:
                self.fail_first -= 1
                raise ConnectionError("broker down")
            self.sent.extend(steps)

    def ids(self) -> list[int]:
        with self.lock:
            return [step_id for step_id, _, _ in self.sent]


def test_a_held_message_goes_out_once_when_its_hold_ends() -> None:
    broker = Broker()
    held = HeldMessages(broker)
    start = time.monotonic()
    held.hold([(1, "research"), (2, "default")], 0.1)
    assert broker.ids() == []  # not before its time
    wait_until(lambda: len(broker.ids()) == 2, timeout=5, interval=0.005, what="both wake-ups sent")
    assert time.monotonic() - start >= 0.1
    assert sorted(broker.sent) == [(1, "research", 0.0), (2, "default", 0.0)]
    time.sleep(0.15)
    assert sorted(broker.ids()) == [1, 2]  # once each
    assert held.held() == set()


def test_a_released_message_is_never_sent() -> None:
    broker = Broker()
    held = HeldMessages(broker)
    held.hold([(1, "research"), (2, "research")], 0.05)
    assert held.release(1) is True  # still held: the worker claims it, no message needed
    wait_until(lambda: broker.ids() == [2], timeout=5, interval=0.005, what="the other wake-up")
    time.sleep(0.1)
    assert broker.ids() == [2]
    assert held.release(2) is False  # it went out already: its claim will find the step taken
    assert held.release(99) is False


def test_holds_end_in_order_of_their_own_time() -> None:
    broker = Broker()
    held = HeldMessages(broker)
    held.hold([(1, "a")], 0.3)
    held.hold([(2, "a")], 0.02)  # held later, due earlier: the thread wakes for it
    wait_until(lambda: broker.ids() == [2], timeout=5, interval=0.005, what="the earlier one")
    wait_until(lambda: broker.ids() == [2, 1], timeout=5, interval=0.005, what="the later one")


def test_send_now_and_flush_publish_what_is_still_held() -> None:
    broker = Broker()
    held = HeldMessages(broker)
    held.hold([(1, "a"), (2, "a"), (3, "b")], 60)
    held.release(2)
    held.send_now([1, 2])  # 2 was released: nothing to send for it
    assert broker.ids() == [1]
    held.flush()  # a stopping process sends the rest
    assert broker.ids() == [1, 3]
    assert held.held() == set()


def test_a_failed_publish_is_logged_and_later_holds_still_go_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = Broker(fail_first=1)
    held = HeldMessages(broker)
    held.hold([(1, "a")], 0.01)
    wait_until(
        lambda: "publishing held wake-ups for steps [1] failed" in caplog.text,
        timeout=5,
        interval=0.005,
        what="the failure logged",
    )
    held.hold([(2, "a")], 0.01)
    wait_until(lambda: broker.ids() == [2], timeout=5, interval=0.005, what="the next wake-up")
