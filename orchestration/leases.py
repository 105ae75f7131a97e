"""Leases and time limits of the steps a worker process is running.

A claimed step's lease is renewed from one background thread while its agent runs; the same
thread enforces hard timeouts. Soft timeouts interrupt the agent with SIGALRM where the
process can receive it (Celery's own soft time limit works the same way).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from orchestration.errors import Code, StepTimeout

#: Extends the leases of (step id, token, owner) until the given time (``Store.leases_renew``).
Renew = Callable[[list[tuple[int, int, str]], datetime], None]
#: Fails an attempt that passed its hard timeout: (step id, token, owner).
OnHardTimeout = Callable[[int, int, str], None]

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the leases of steps this process is running, from one background thread, and
    enforces their hard timeouts: an attempt still running at its hard deadline is failed
    (as a transient ``step_hard_timeout``) and fenced off, so whatever it returns later is
    discarded, even if the agent never yields. If the whole process is stuck, its leases
    simply stop being renewed and the reaper does the same."""

    #: How often the loop looks at hard deadlines, at most (seconds).
    TICK = 0.25

    def __init__(
        self, *, renew: Renew, on_hard_timeout: OnHardTimeout, lease_seconds: float
    ) -> None:
        self._renew = renew
        self._on_hard_timeout = on_hard_timeout
        self.lease_seconds = lease_seconds
        self._held: dict[int, tuple[int, str, float | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def hold(
        self, step_id: int, token: int, worker_id: str, *, hard_after: float | None = None
    ) -> Iterator[None]:
        deadline = time.monotonic() + hard_after if hard_after else None
        with self._lock:
            self._held[step_id] = (token, worker_id, deadline)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(step_id, None)

    def _loop(self) -> None:
        interval = self.lease_seconds / 3
        next_renewal = time.monotonic() + interval
        while not self._stop.wait(min(self.TICK, interval)):
            with self._lock:
                held = dict(self._held)
            if not held:
                next_renewal = time.monotonic() + interval
                continue
            now = time.monotonic()
            overdue = {k: v for k, v in held.items() if v[2] is not None and now >= v[2]}
            for step_id, (token, owner, _deadline) in overdue.items():
                with self._lock:
                    self._held.pop(step_id, None)
                self._hard_timeout(step_id, token, owner)
            if now < next_renewal:
                continue
            next_renewal = now + interval
            try:
                until = timezone.now() + timedelta(seconds=self.lease_seconds)
                # Fenced: a lease that was lost (re-claimed by another worker) is not renewed.
                self._renew(
                    [
                        (step_id, token, owner)
                        for step_id, (token, owner, _) in held.items()
                        if step_id not in overdue
                    ],
                    until,
                )
            except Exception:
                log.warning("lease renewal failed", exc_info=True)
            finally:
                close_old_connections()

    def _hard_timeout(self, step_id: int, token: int, owner: str) -> None:
        try:
            log.warning(
                "step %s passed its hard timeout; its attempt %s is abandoned", step_id, token
            )
            self._on_hard_timeout(step_id, token, owner)
        except Exception:
            log.warning("failing step %s at its hard timeout failed", step_id, exc_info=True)
        finally:
            close_old_connections()

    def close(self) -> None:
        """Stop the thread (running steps' leases then expire and the reaper takes them)."""
        self._stop.set()


@contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in the agent when its soft timeout passes, as Celery's soft
    time limit does: with SIGALRM, which only the main thread can receive. Elsewhere (the
    embedded worker thread) agents see the deadline cooperatively, in ``ctx.check_timeout()``."""
    if (
        seconds <= 0
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "setitimer")
    ):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise StepTimeout(
            f"the step ran past its soft timeout of {seconds:g} s", code=Code.STEP_TIMEOUT
        )

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def alarm_blocked() -> Iterator[None]:
    """Hold SIGALRM back (the soft timeout's interrupt) for a moment that must not be cut in
    two, such as reading a commit's outcome from the connection; it arrives right after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_sigmask"
    ):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
