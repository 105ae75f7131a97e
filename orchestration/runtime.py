"""The one owner of a process's engine state.

A worker process (or a web process, or the embedded demo) holds a few things that live as long
as it does and must never cross a fork: its store (with the PostgreSQL store's id blocks), the
wake-ups it holds back for a moment, its live-event sender (an event loop and a view of group membership), its lease
keeper and the pools it serves. :class:`Runtime` holds them; it is created in the process that
uses it (a Celery worker's child at ``worker_process_init``, see ``orchestration.signals``; any
other process on first use, by :func:`current`) and closed at shutdown. Code that runs steps is
handed the runtime; nothing else keeps such state in a module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from django.conf import settings

from orchestration.held import HeldMessages
from orchestration.leases import LeaseKeeper, OnHardTimeout
from orchestration.live import LiveSender
from orchestration.settling import BlockSettlements
from orchestration.store import Store, store_create

log = logging.getLogger(__name__)


class Runtime:
    """The engine state of one process (see the module docstring)."""

    def __init__(self, pools: Iterable[str] = ()) -> None:
        self.pid = os.getpid()
        #: The worker pools this process serves (empty: it never runs steps).
        self.pools: frozenset[str] = frozenset(pools)
        self.store: Store = store_create()
        self.held = HeldMessages()
        self.settling = BlockSettlements()
        self.live = LiveSender()
        self._leases: LeaseKeeper | None = None
        self._lock = threading.Lock()

    @property
    def lease_seconds(self) -> float:
        return float(settings.SIGNALBOX["LEASE_SECONDS"])

    def leases(self, on_hard_timeout: OnHardTimeout) -> LeaseKeeper:
        """The lease keeper of this process, made on first use (by a worker)."""
        with self._lock:
            if self._leases is None:
                self._leases = LeaseKeeper(
                    renew=self.store.leases_renew,
                    on_hard_timeout=on_hard_timeout,
                    lease_seconds=self.lease_seconds,
                )
            return self._leases

    def serve(self, pools: Iterable[str]) -> None:
        self.pools = frozenset(pools)

    def close(self) -> None:
        """The process is stopping: send what is held back, stop the background threads."""
        try:
            self.held.flush()
        except Exception:
            log.warning("sending held wake-ups at shutdown failed", exc_info=True)
        self.settling.flush()
        if self._leases is not None:
            self._leases.close()
        self.live.close()


_current: Runtime | None = None
_current_lock = threading.Lock()


def current() -> Runtime:
    """This process's runtime; a process that has none yet (or a forked child still holding
    its parent's) gets a new one."""
    global _current
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Runtime()
        return _current


def install(runtime: Runtime) -> Runtime:
    """Make ``runtime`` this process's (a worker's child after fork, the embedded stack)."""
    global _current
    with _current_lock:
        previous, _current = _current, runtime
    if previous is not None and previous is not runtime and previous.pid == os.getpid():
        previous.close()
    return runtime


def close() -> None:
    """Close this process's runtime, if it has one (shutdown)."""
    global _current
    with _current_lock:
        runtime, _current = _current, None
    if runtime is not None and runtime.pid == os.getpid():
        runtime.close()
