"""Decisions through the REST API (issue 19): decisions/s and resume latency, served as deployed.

Runs of the reference workload are brought to their approval by the workers; then 8 client
threads approve them as fast as they can, either one call per approval
(``POST /approvals/{id}/decide``) or through the bulk endpoint (``POST /approvals/decide``,
``--bulk-size`` approvals per call). Resume latency is measured from the moment the client
started the call that decided an approval to the moment the run's next step (publish) started,
from the worker's own timestamp: the same clock, one machine.

decisions/s = approvals / (first call started -> last call answered).

With a ``rate``, the calls are started on a schedule (that many approvals a second, offered)
instead of as fast as the clients can: resume latency at a load the machine sustains, not the
queue a burst builds behind the workers (issue 19 asks for 300 decisions/s *with* resume p99
under 100 ms).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from tests.bench.run import Counters, Row, wait_all

CLIENTS = 8


def approvals_ready(n: int) -> tuple[list[int], list[int]]:
    """``n`` runs paused at their approval: (run ids, open approval ids)."""
    from orchestration.models import Wait
    from orchestration.services import run_submit

    ids = [
        run_submit(workflow="reference_workload", input={"needs_approval": True}).run.pk
        for _ in range(n)
    ]
    wait_all(ids, "waiting")
    waits = list(
        Wait.objects.filter(run_id__in=ids, status="open")
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    assert len(waits) == n, len(waits)
    return ids, waits


def bench_decisions(
    n: int,
    counters: Counters,
    client: Any,
    *,
    bulk_size: int = 0,
    clients: int = CLIENTS,
    rate: float = 0,
    cpu: Callable[[], dict[str, float]] | None = None,
) -> Row:
    """Decide ``n`` approvals from ``clients`` threads; ``bulk_size`` > 0 uses the bulk endpoint;
    ``rate`` > 0 starts the calls on a schedule of that many approvals a second. With ``cpu``
    (the processes' CPU seconds so far, by kind), the note gives each kind's CPU per decision
    from the first call to the last resumed run: the decisions' cost without the runs' way to
    their approvals."""
    from orchestration.models import Step, Wait

    how = f"bulk endpoint, {bulk_size} per call" if bulk_size else "one call each"
    paced = f", {rate:,.0f}/s offered" if rate else ""
    row = Row(f"decisions, {clients} clients, {how}{paced}", n)
    ids, waits = approvals_ready(n)
    started_at: dict[int, float] = {}
    if bulk_size:
        calls = [waits[i : i + bulk_size] for i in range(0, len(waits), bulk_size)]
    else:
        calls = [[w] for w in waits]

    def decide(batch: list[int]) -> None:
        t0 = time.time()
        for wait_id in batch:
            started_at[wait_id] = t0
        if bulk_size:
            response = client.post(
                "/approvals/decide", json={"ids": batch, "decision": "approve", "reason": "bench"}
            )
            response.raise_for_status()
            refused = [o for o in response.json() if not o["ok"]]
            assert not refused, refused
        else:
            response = client.post(
                f"/approvals/{batch[0]}/decide", json={"decision": "approve", "reason": "bench"}
            )
            response.raise_for_status()

    def on_schedule(numbered: tuple[int, list[int]]) -> None:
        position, batch = numbered
        if rate:
            delay = start + position * len(calls[0]) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        decide(batch)

    xid0, push0 = counters.snapshot()
    cpu0 = cpu() if cpu else {}
    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(on_schedule, enumerate(calls)))
    answered = time.monotonic()
    wait_all(ids, "succeeded")
    cpu1 = cpu() if cpu else {}
    xid1, push1 = counters.snapshot()
    row.seconds = answered - start
    row.steps = n
    row.write_tx = xid1 - xid0 - 1
    row.broker_msgs = push1 - push0
    run_of = dict(Wait.objects.filter(pk__in=waits).values_list("pk", "run_id"))
    publish: dict[int, datetime] = dict(
        Step.objects.filter(run_id__in=ids, node="publish").values_list("run_id", "started_at")
    )
    row.latencies_ms = [(publish[run_of[w]].timestamp() - started_at[w]) * 1000 for w in waits]
    decided = Wait.objects.filter(pk__in=waits).values_list("decided_at", flat=True)
    first = min(started_at.values())
    last_decided = max(d for d in decided if d is not None)
    row.note = (
        f"all decided {(last_decided.timestamp() - first) * 1000:.0f} ms after the first call; "
        f"first call {datetime.fromtimestamp(first, UTC):%H:%M:%S} UTC"
    )
    if cpu:
        row.note += "; CPU ms per decision: " + ", ".join(
            f"{kind} {(cpu1[kind] - cpu0[kind]) * 1000 / n:.1f}" for kind in cpu1
        )
    return row
