"""Budget blocks a worker is done with, settled several at a time.

Settling a block (``policies.blocks``) moves every scope row it counts against: the run's and
the ones every worker shares (a workflow's day, a tenant's month, the global day). Written in
the batch of its run's last completion in the worker, as it was first, that is four row
updates a run, three of them on rows every worker takes turns to lock. So a worker keeps the
settlements of the blocks it is done with here and writes them together: when
``SIGNALBOX["CEILING_SETTLE_TOGETHER"]`` of them are waiting, as one statement of the batch
that adds the last one (``policies.ledger.settlements_prepared``: each shared row written once
for them all), and otherwise from one background thread when the first has waited
``CEILING_SETTLE_SECONDS``, in a transaction of its own.

Why no money is lost or passed: a block waiting here is still ``held``, so its whole amount
still counts in every scope; settling it late only keeps that room taken a little longer. Its
calls were recorded with their completions. If the process dies before it settles them, the
reaper releases the blocks at their expiry and charges those recorded calls
(``policies.ledger.reservations_release_expired``), as it does for a block in use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.db import close_old_connections, connection

from policies.ledger import Settlement, settlements_apply

log = logging.getLogger(__name__)

Apply = Callable[[list[Settlement]], None]


class BlockSettlements:
    """Settlements of budget blocks waiting to be written, oldest first."""

    def __init__(self, apply: Apply = settlements_apply) -> None:
        self._apply = apply
        #: (settlement, when it is due to be written on its own, ``time.monotonic()``)
        self._waiting: list[tuple[Settlement, float]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def add(self, settlement: Settlement, seconds: float) -> None:
        """Write ``settlement`` at the latest in ``seconds`` (with others, if any come)."""
        with self._cond:
            self._waiting.append((settlement, time.monotonic() + seconds))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="block-settlements", daemon=True
                )
                self._thread.start()
            if len(self._waiting) == 1:  # else the thread waits already, for an earlier one
                self._cond.notify()

    def take(self, at_least: int) -> list[Settlement]:
        """All the waiting settlements if there are ``at_least`` of them (else none): the
        caller writes them, in its batch."""
        with self._cond:
            if len(self._waiting) < at_least:
                return []
            taken, self._waiting = self._waiting, []
        return [settlement for settlement, _ in taken]

    def flush(self) -> None:
        """Write everything waiting now (the process is stopping)."""
        self._write(self.take(1))

    def _write(self, settlements: list[Settlement]) -> None:
        if not settlements:
            return
        try:
            self._apply(settlements)
        except Exception:  # the reaper releases them at their expiry, charging their calls
            log.exception(
                "settling budget blocks %s failed", [s.reservation_id for s in settlements]
            )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                wait = self._waiting[0][1] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                taken, self._waiting = self._waiting, []
            self._write([settlement for settlement, _ in taken])
            # This thread writes seldom (the batches write the rest): no connection is kept.
            close_old_connections()
            connection.close()
