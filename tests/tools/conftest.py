"""Fixtures for tool-registry tests: stub provider servers, unique provider names (their Redis
state is removed afterwards) and a fake clock whose sleeps are instant and recorded."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from orchestration.tools.limit_backends import backend_default
from tests.support.stub_provider import StubProvider, stub_provider_server


class FakeClock:
    """Wall and monotonic time that move only when slept on (or advanced)."""

    def __init__(self) -> None:
        self.now = time.time()
        self.mono = 1_000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider_name() -> Iterator[Callable[[str], str]]:
    """Unique provider names, so tests never share a bucket or a circuit; forgotten at the end."""
    made: list[str] = []

    def make(label: str) -> str:
        name = f"{label}-{uuid.uuid4().hex[:8]}"
        made.append(name)
        return name

    yield make
    for name in made:
        backend_default().reset(name)


@pytest.fixture
def stubs() -> Iterator[Callable[[str], StubProvider]]:
    """Start stub provider servers for this test: ``stub = stubs("search-a")``."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(stub_provider_server(name))


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    """Start fresh Python processes (spawn: nothing inherited, as separate workers)."""
    context = multiprocessing.get_context("spawn")
    started: list[Any] = []

    def start(target: Callable[..., None], *args: Any) -> Any:
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.join(10)
        if process.is_alive():
            process.kill()
