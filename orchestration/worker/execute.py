"""The worker's loop: claim the step a message names, run it, then whatever this worker claimed
for itself along the way (its chain), then the siblings it handed off in its own pools."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta
from functools import partial

from django.utils import timezone

from orchestration.models import Step
from orchestration.runtime import Runtime
from orchestration.worker import complete
from orchestration.worker.attempt import step_run
from orchestration.worker.chain import Chain, Superseded, claim_events


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def step_claim(step_id: int, *, rt: Runtime, worker_id: str) -> Step | None:
    """Take a queued, due step with a lease; ``None`` when someone else has it or it is not due."""
    now = timezone.now()
    step = rt.store.claim(step_id, worker_id, now, now + timedelta(seconds=rt.lease_seconds))
    if step is not None:
        events = [{k: v for k, v in e.items() if k != "step"} for e in claim_events(step, now)]
        rt.live.send([{"run_id": step.run_id, "step_id": step.pk, **e} for e in events])
    return step


def step_execute(step_id: int, *, rt: Runtime, worker_id: str) -> int:
    """Claim and run ``step_id``, then any successor this worker claimed locally.

    Returns how many steps ran to an outcome. Safe to call with a stale or duplicate message:
    the claim decides, and a step that is not queued is left alone. When the local chain ends,
    steps of the same run that were handed to the broker for this worker's pools are claimed
    here if no other worker has taken them yet. Their wake-up messages are held back meanwhile
    (``orchestration.held``); one that went out anyway finds the step taken."""
    chain = Chain(
        worker_id,
        rt,
        recommit=lambda done, run: complete.recommit(
            done, run, rt=rt, worker_id=worker_id, chain=chain
        ),
        commit_failed=partial(complete.commit_failed, rt=rt, worker_id=worker_id),
    )
    step = step_claim(step_id, rt=rt, worker_id=worker_id)
    ran = 0
    try:
        while True:
            while step is not None:
                try:
                    step = step_run(step, rt=rt, worker_id=worker_id, chain=chain)
                    ran += 1
                except Superseded as superseded:
                    step = superseded.next_step
            step = chain.finish()
            while step is None and chain.handed_off:
                sibling = chain.handed_off.pop(0)
                step = step_claim(sibling.pk, rt=rt, worker_id=worker_id)
                # Claimed here, or taken by another worker: either way no message is needed.
                rt.held.release(sibling.pk)
            if step is None:
                return ran
    finally:
        chain.close()
