"""The worker's loop: claim the step a message names, run it, then whatever this worker claimed
for itself along the way (its chain), then the siblings it handed off in its own pools."""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta
from functools import partial
from typing import Any

from django.utils import timezone

from orchestration.dispatch import hint_of
from orchestration.models import Step
from orchestration.runtime import Runtime
from orchestration.worker import complete
from orchestration.worker.attempt import step_run
from orchestration.worker.chain import Chain, Superseded, claim_events
from orchestration.worker.costs import block_of, hold_for_hint, worst_keep


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def step_claim(
    step_id: int,
    *,
    rt: Runtime,
    worker_id: str,
    chain: Chain | None = None,
    hint: list[Any] | None = None,
) -> Step | None:
    """Take a queued, due step with a lease; ``None`` when someone else has it or it is not due.
    With a ``hint`` from its message and a ``chain``, the step's reservation is made in the
    claim's own transaction where a cost ceiling counts its call (no transaction of its own)."""
    now = timezone.now()
    lease_until = now + timedelta(seconds=rt.lease_seconds)
    priced = (
        hold_for_hint(hint, step_id, worker_id, now)
        if hint and chain is not None and rt.store.pipelined
        else None
    )
    if priced is None:
        step = rt.store.claim(step_id, worker_id, now, lease_until)
    else:
        assert chain is not None
        # The first of the run's calls in this worker's chain: a budget block.
        request, worst, active = block_of(priced[0]), priced[1], priced[2]
        step, batch = rt.store.claim_holding(step_id, worker_id, now, lease_until, request)
        if step is not None:
            chain.holds[step.pk] = batch
            if request.action != f"agent:{step.agent}" or request.run_id != step.run_id:
                chain.release_held(step.pk)  # a hint that does not describe its step: unused
            elif hint == hint_of(step):  # priced for exactly this step: asked once
                worst_keep(step, active, worst)
    if step is not None:
        events = [{k: v for k, v in e.items() if k != "step"} for e in claim_events(step, now)]
        rt.live.send([{"run_id": step.run_id, "step_id": step.pk, **e} for e in events])
    return step


def step_execute(
    step_id: int, *, rt: Runtime, worker_id: str, hint: list[Any] | None = None
) -> int:
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
    step = step_claim(step_id, rt=rt, worker_id=worker_id, chain=chain, hint=hint)
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
