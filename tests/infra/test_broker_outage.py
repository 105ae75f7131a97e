"""A worker survives a Redis outage: it reconnects, and work submitted before, during and after
the outage finishes.

Redis here is a private ``redis-server`` the test starts, stops and starts again (never the
shared one the rest of the suite uses). The worker is a real ``celery worker`` process started
as production starts it (gossip, mingle and heartbeats on: with them, a broker outage used to
kill the worker, see ``infra.broker.Channel._connparams``), and this process publishes to the
same private Redis.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection
from kombu.exceptions import OperationalError

from orchestration import recovery
from orchestration.models import Run
from orchestration.services import run_submit
from tests.conftest import ROOT, WorkerProcess, wait_until

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` owned by the test, on a port of its own, stopped and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="redis-", suffix=".log")[1])

    def start(self) -> None:
        assert self.proc is None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: self._answers(client), timeout=10, what="the private redis-server")
        client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """Stop the server as an operator would (SIGTERM; nothing is saved)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class ProductionWorker(WorkerProcess):
    """tests.conftest's worker process, on a broker of the test's choosing, started with the
    production command's options (gossip, mingle and heartbeats on)."""

    def __init__(self, name: str, redis_url: str, concurrency: int = 2) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"worker-{name}-", suffix=".log")[1])
        db = settings.DATABASES["default"]
        env = {
            **os.environ,
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "REDIS_URL": redis_url,
            "PYTHONPATH": str(ROOT),
            "SIGNALBOX_AGENT_TIME_SCALE": "0",
            "SIGNALBOX_LEASE_SECONDS": "3",
            "SIGNALBOX_LIVE_EVENTS": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "console",
            "worker",
            "-Q",
            "pool.default,pool.research",
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "--prefetch-multiplier",
            "1",
            "-l",
            "info",
        ]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def alive(self) -> bool:
        return self.proc.poll() is None and "Unrecoverable error" not in self.log_path.read_text()

    def connections(self) -> int:
        """How many times the worker has connected to the broker."""
        return self.log_path.read_text().count("celery.worker.consumer.connection Connected to")


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def publish_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point this process's Celery app (the engine's wake-up messages) at another broker."""
    from console.celery import app

    app.conf.broker_url  # noqa: B018  (Celery reads Django's settings on first use: now)
    saved = app._pool, app.amqp._producer_pool

    def point(url: str) -> None:
        monkeypatch.setitem(app.conf, "broker_url", url)
        app._pool = None  # the broker connection pools are built from the URL on first use
        app.amqp._producer_pool = None

    yield point
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool, app.amqp._producer_pool = saved


def submit() -> int:
    """Submit a reference run. While Redis is down, the wake-up message sent after commit may
    fail; the run is committed all the same and the reaper publishes its message again."""
    latest = Run.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    try:
        return run_submit(workflow="reference_workload", input={}).run.pk
    except (redis.ConnectionError, OperationalError):
        return Run.objects.filter(pk__gt=latest).order_by("pk").values_list("pk", flat=True)[0]


class Submitter(threading.Thread):
    """Submits runs steadily (about 30 a second) until stopped, so the worker holds
    unacknowledged messages whenever the broker goes away."""

    def __init__(self) -> None:
        super().__init__(name="submitter")
        self.run_ids: list[int] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.run_ids.append(submit())
                time.sleep(0.03)
        finally:
            connection.close()

    def stop(self) -> list[int]:
        self.stopping.set()
        self.join(30)
        return self.run_ids


def wait_for_all(run_ids: list[int], worker: ProductionWorker, timeout: float = 60) -> None:
    """Every run succeeds; the reaper (called here, as beat would) republishes the messages
    that were lost with the broker."""
    deadline = time.monotonic() + timeout
    pending = run_ids
    while pending:
        assert worker.alive(), f"the worker died: {worker.log()}"
        assert time.monotonic() < deadline, (
            f"{len(pending)} of {len(run_ids)} runs unfinished: {worker.log()}"
        )
        recovery.engine_tick()
        unfinished = Run.objects.filter(pk__in=pending).exclude(status="succeeded")
        failed = list(
            unfinished.filter(status__in=["failed", "cancelled"]).values_list("pk", "error_message")
        )
        assert not failed, failed
        pending = list(unfinished.values_list("pk", flat=True))
        time.sleep(0.25)
        connection.close()


def test_closing_a_connection_the_broker_dropped_raises_only_connection_errors(
    private_redis: PrivateRedis,
) -> None:
    """The worker's sequence when the broker goes away, replayed step by step: Celery collects
    the connection, then closes it, ignoring connection errors. With kombu's own Redis
    transport (5.7.0) the close raised AttributeError, which killed the worker."""
    from kombu import Connection, Consumer, Exchange, Queue
    from kombu.common import ignore_errors

    from infra.broker import Channel

    conn = Connection(private_redis.url)
    channel = conn.default_channel
    assert isinstance(channel, Channel)
    received: list[Any] = []
    Consumer(
        channel,
        [Queue("pool.outage", no_declare=True)],
        callbacks=[lambda body, message: received.append(message)],
    ).consume()
    conn.Producer(channel).publish({"n": 1}, routing_key="pool.outage", exchange="", declare=[])
    conn.drain_events(timeout=5)
    assert len(received) == 1  # delivered, not acknowledged: to be restored at close
    # A second channel with an automatically deleted fanout queue, as Celery's gossip has;
    # deleting it needs Redis, so closing this channel fails first.
    gossip = Exchange("celeryev.outage", type="fanout")
    Consumer(
        conn.channel(), [Queue("gossip.outage", gossip, auto_delete=True)], no_ack=True
    ).consume()
    channel._brpop_start()  # the worker had a free slot: a BRPOP is waiting

    private_redis.stop()
    with contextlib.suppress(Exception):  # Celery ignores whatever collecting raises
        conn.collect(socket_timeout=5)
    # Celery ignores connection errors here, and nothing else: with kombu's own transport this
    # raised AttributeError("'NoneType' object has no attribute 'hostname'").
    ignore_errors(conn, conn.close)


def test_a_worker_survives_redis_outages_and_finishes_work_from_before_during_and_after(
    private_redis: PrivateRedis, publish_to: Callable[[str], None], fast_agents: None, settings: Any
) -> None:
    # Messages lost with the broker are republished after a second, not the production thirty.
    settings.SIGNALBOX = {**settings.SIGNALBOX, "REPUBLISH_AFTER_SECONDS": 1.0}
    publish_to(private_redis.url)
    worker = ProductionWorker("outage", private_redis.url)
    try:
        before = submit()
        wait_for_all([before], worker)

        submitter = Submitter()
        submitter.start()
        # Two outages, each while the worker is busy: how the broker's loss surfaces in the
        # worker (which connection notices first) varies from one outage to the next.
        for outage in range(2):
            time.sleep(1.5)
            private_redis.stop()
            time.sleep(4.0)
            private_redis.start()
            wait_until(
                lambda n=outage: worker.connections() >= n + 2,
                timeout=30,
                what="the worker to reconnect",
            )
            assert worker.alive(), worker.log()
        time.sleep(1.0)
        during = submitter.stop()

        after = submit()
        wait_for_all([*during, after], worker)
        assert len(during) > 100  # work was flowing throughout
        assert worker.alive() and worker.connections() == 3, worker.log()
    finally:
        worker.stop()
