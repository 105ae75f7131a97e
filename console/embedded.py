"""Embedded mode: the web server, a Celery worker, the scheduler and (optionally) the demo
simulator, all in one process and one asyncio loop's reach.

The ASGI server (uvicorn, with websockets) owns the main thread's event loop; the in-memory
channel layer lives on that loop, so live events are sent there (the runtime's ``live.use_loop``). The
worker consumes the in-process ``memory://`` broker from a thread, with a thread pool. This
module owns SIGINT/SIGTERM: it stops the things that create and run work first, then the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from django.db import connections

from console.notifications import notifications_scan
from orchestration import runtime
from orchestration.recovery import engine_tick
from orchestration.services import waits_escalate_breached
from orchestration.signals import POOL_PREFIX

#: How often the embedded scheduler sends due notifications.
NOTIFY_SCAN_SECONDS = 10.0

log = logging.getLogger(__name__)

#: How long a stop waits for steps the worker is running before giving up on them (their
#: leases expire and the next start runs them again).
WORKER_STOP_SECONDS = 8.0


class PeriodicThread(threading.Thread):
    """Calls ``work`` every ``interval`` seconds until stopped; one pass is one call.

    Each pass closes the thread's database connections, so a long-lived thread never holds
    a stale connection or an open SQLite read snapshot between passes."""

    def __init__(self, name: str, interval: float, work: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.work = work
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.work()
            except Exception:  # one failed pass must not end the loop
                log.exception("%s pass failed", self.name)
            finally:
                connections.close_all()
            self._halt.wait(self.interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._halt.set()
        self.join(timeout)


class WorkerThread:
    """A Celery worker consuming every pool's queue from a thread, with a thread pool."""

    def __init__(self, pools: list[str], concurrency: int = 4) -> None:
        from celery import signals

        from console.celery import app

        self.pools = pools
        self.concurrency = concurrency
        self.ready = threading.Event()
        # The worker runs in threads of this process: they share its runtime.
        runtime.current().serve(pools)
        signals.worker_ready.connect(
            self._on_ready, weak=False, dispatch_uid="embedded-worker-ready"
        )
        self.worker = app.Worker(
            pool="threads",
            concurrency=concurrency,
            queues=[f"{POOL_PREFIX}{p}" for p in pools],
            hostname=f"embedded@{socket.gethostname()}",
            without_mingle=True,
            without_gossip=True,
            without_heartbeat=True,
            loglevel="WARNING",
            # Keep print() going to the terminal, and no startup banner in the middle of ours.
            redirect_stdouts=False,
            quiet=True,
        )
        self.thread = threading.Thread(target=self.worker.start, name="celery-worker", daemon=True)

    def _on_ready(self, **kwargs: Any) -> None:
        self.ready.set()

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the embedded Celery worker did not start (see the log above)")

    def stop(self, timeout: float = WORKER_STOP_SECONDS) -> bool:
        """Warm shutdown: stop consuming, let running steps finish. False if some did not."""
        from celery.worker import state

        # What Celery's own SIGTERM handler does; the consumer loop notices within ~2 s.
        state.should_stop = 0
        self.thread.join(timeout)
        return not self.thread.is_alive()


@dataclass
class EmbeddedOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    concurrency: int = 4
    tick_seconds: float = 2.0
    simulator: Callable[[], Any] | None = None
    simulator_seconds: float = 1.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The embedded runner owns SIGINT/SIGTERM so it can stop the worker before the server.
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so "port in use" is a clear error, not a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class EmbeddedStack:
    """Runs everything until SIGINT/SIGTERM, then stops it in order: simulator and scheduler
    (they create work), the worker (it finishes running steps), then the web server."""

    def __init__(
        self,
        options: EmbeddedOptions,
        pools: list[str],
        *,
        on_ready: Callable[[EmbeddedStack], None] | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.options = options
        self.pools = pools
        self.on_ready = on_ready
        self.say = say
        self.worker: WorkerThread | None = None
        self.threads: list[PeriodicThread] = []
        self.clean_stop = True

    def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until a signal; blocks the calling (main) thread."""
        asyncio.run(self._main(sock))

    async def _main(self, sock: socket.socket) -> None:
        from console.asgi import application

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        first_signal_at: float | None = None

        def on_signal() -> None:
            nonlocal first_signal_at
            now = time.monotonic()
            if first_signal_at is None:
                first_signal_at = now
                stop.set()
            # A repeat within a second is the same interrupt delivered twice (to the process and
            # its group, as `timeout` does); a later one is someone insisting.
            elif now - first_signal_at > 1.0:
                self.say("Interrupted again: exiting now; running steps resume at the next start.")
                os._exit(130)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        runtime.current().live.use_loop(loop)

        config = uvicorn.Config(
            application,
            lifespan="off",  # Django's ASGI handler does not speak lifespan
            log_level="warning",
            access_log=False,
            ws="websockets-sansio",
            timeout_graceful_shutdown=3,
            server_header=False,
        )
        server = _Server(config)
        served = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if served.done():
                await served  # re-raises why the server could not start
                return
            await asyncio.sleep(0.02)

        try:
            await asyncio.to_thread(self._start_background)
        except Exception:
            await asyncio.to_thread(self._stop_background)
            server.should_exit = True
            await served
            raise
        if self.on_ready is not None:
            self.on_ready(self)

        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({served, waiter}, return_when=asyncio.FIRST_COMPLETED)
        self.say("Stopping: simulator, scheduler, worker, then the web server…")
        await asyncio.to_thread(self._stop_background)
        server.should_exit = True
        await served
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _start_background(self) -> None:
        self.worker = WorkerThread(self.pools, concurrency=self.options.concurrency)
        self.worker.start()
        self.threads.append(PeriodicThread("scheduler", self.options.tick_seconds, engine_tick))
        self.threads.append(
            PeriodicThread("sla", self.options.tick_seconds, waits_escalate_breached)
        )
        self.threads.append(
            PeriodicThread("notifications", NOTIFY_SCAN_SECONDS, notifications_scan)
        )
        if self.options.simulator is not None:
            self.threads.append(
                PeriodicThread("simulator", self.options.simulator_seconds, self.options.simulator)
            )
        for thread in self.threads:
            thread.start()

    def _stop_background(self) -> None:
        for thread in reversed(self.threads):
            thread.stop()
        if self.worker is not None and not self.worker.stop():
            self.clean_stop = False
            self.say(
                f"The worker was still running steps after {WORKER_STOP_SECONDS:.0f}s; leaving them. "
                "Their leases expire and they run again at the next start."
            )
