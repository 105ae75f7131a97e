"""Wake-up messages held back for a moment: steps a worker handed off but may still run itself.

When a completion makes several steps ready in pools this worker serves, the worker runs one
of them right away (eager local execution) and hands the others off. When its local chain
stops, it claims those itself, the first one in the chain's last completion transaction. A
broker message for them is then wasted: the worker takes it back from the queue, or another
worker wakes up for it only to lose the race for the step, and on two cores that race slows
the winner too. A message is only needed when the local chain is slow, so that another
worker runs the sibling in parallel.

So the message of a handed-off step is held for ``SIGNALBOX["HANDOFF_HOLD_SECONDS"]``
(default 20 ms, far below any real agent's duration): a step this worker claims meanwhile
never costs a message, and the others are published when their time comes, by one
background thread per process. If the chain fails before trying to claim them, or the
worker stops, they are published at once rather than when their hold ends. Nothing is lost if the process dies holding
messages: the steps are committed as queued, and the reaper publishes queued steps that
have had no message for ``REPUBLISH_AFTER_SECONDS``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

Publish = Callable[[list[tuple[int, str, float]]], None]


class HeldMessages:
    """Step wake-ups waiting to be published, by step id, each with its due time."""

    def __init__(self, publish: Publish | None = None) -> None:
        #: Sends wake-ups: given here or by the latest :meth:`hold` (``orchestration.dispatch``).
        self._publish = publish
        self._due: dict[int, tuple[float, str]] = {}
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def hold(
        self, steps: Iterable[tuple[int, str]], seconds: float, publish: Publish | None = None
    ) -> None:
        """Publish these (step id, pool) wake-ups in ``seconds`` unless released before."""
        due = time.monotonic() + seconds
        with self._cond:
            if publish is not None:
                self._publish = publish
            for step_id, pool in steps:
                self._due[step_id] = (due, pool)
                heapq.heappush(self._heap, (due, step_id))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="held-messages", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def release(self, step_id: int) -> bool:
        """This worker tried to claim the step itself (and took it, or found it taken): drop its
        message. True if the message was still held (nothing was published); False if it went
        out already (or never was held)."""
        with self._cond:
            return self._due.pop(step_id, None) is not None

    def send_now(self, step_ids: Iterable[int]) -> None:
        """Publish at once whatever of these is still held (the local chain will not claim them)."""
        with self._cond:
            ready = [
                (step_id, self._due.pop(step_id)[1]) for step_id in step_ids if step_id in self._due
            ]
        self._send(ready)

    def flush(self) -> None:
        """Publish everything still held (the process is stopping)."""
        with self._cond:
            ready = [(step_id, pool) for step_id, (_due, pool) in self._due.items()]
            self._due.clear()
            self._heap.clear()
        self._send(ready)

    def held(self) -> set[int]:
        with self._cond:
            return set(self._due)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready_now():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                now = time.monotonic()
                ready = []
                while self._heap and self._heap[0][0] <= now:
                    due, step_id = heapq.heappop(self._heap)
                    entry = self._due.get(step_id)
                    if entry is not None and entry[0] == due:  # not released, not held again
                        del self._due[step_id]
                        ready.append((step_id, entry[1]))
            self._send(ready)

    def _ready_now(self) -> bool:
        return bool(self._heap) and self._heap[0][0] <= time.monotonic()

    def _send(self, ready: list[tuple[int, str]]) -> None:
        if not ready:
            return
        publish = self._publish
        if publish is None:  # nobody said how: the reaper publishes them later
            log.warning("no publisher for held wake-ups of steps %s", [s for s, _ in ready])
            return
        try:
            publish([(step_id, pool, 0.0) for step_id, pool in ready])
        except Exception:
            # The reaper publishes them later; a failed publish must not kill the thread.
            log.warning(
                "publishing held wake-ups for steps %s failed", [s for s, _ in ready], exc_info=True
            )
