"""Cost reservations with real worker processes (issue 18): a worker SIGKILLed in the middle of
a priced call gives its reservation back when the reaper takes its lease, the retry on another
worker fits under a ceiling with room for one call, and the spend is what the calls cost, once.

The agent is the OpenAI-compatible chat agent against a local stub endpoint (the worker
processes get its address in their environment); the first call hangs until the worker dies."""

from __future__ import annotations

import os
import signal
from decimal import Decimal
from typing import Any

import pytest

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration import recovery
from orchestration.errors import Code
from orchestration.models import Step, Wait
from orchestration.services import run_submit
from policies.models import Reservation, ReservationStatus, SpendScope
from policies.services import policy_install
from tests.conftest import wait_for_run, wait_until
from tests.policies.documents import PRICED, PRICED_CALL, PRICED_WORST
from tests.support.stub_llm import StubLLM, StubReply, stub_llm_server

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# One call's worst case is 0.002070 (22 tokens in, 1024 out): the run's ceiling fits one call,
# not two, so a retry fits only if the lost attempt's reservation was given back.
POLICY = """
default: allow
ceilings:
  - {scope: run, limit: 0.003}
  - {scope: global_day, limit: 10.00}
prices:
  known-model: {input_per_1k: 0.001, output_per_1k: 0.002}
"""
WORST = Decimal("0.002070")
# What the endpoint reports for a finished call: 30 tokens in, 200 out.
ONE_CALL = Decimal("0.00043")
PROMPT = "Summarise ticket 7"


def _llm_env(llm: StubLLM) -> dict[str, str]:
    return {"SIGNALBOX_LLM_BASE_URL": llm.base_url, "SIGNALBOX_LLM_MODEL": "known-model"}


def _hanging(llm: StubLLM, seconds: float) -> None:
    """The next call gets its reply only after ``seconds``."""
    body = llm.completion({"model": "known-model", "messages": [{"content": PROMPT}]})
    llm.queue(StubReply(body=body, delay_seconds=seconds))


def _run_scope(run_id: int) -> SpendScope:
    return SpendScope.objects.get(kind="run", key=str(run_id))


def _held(run_id: int) -> Any:
    return Reservation.objects.filter(run_id=run_id, status=ReservationStatus.HELD).first()


def test_a_worker_killed_mid_call_gives_its_reservation_back_and_the_retry_is_charged_once(
    start_worker: Any,
) -> None:
    policy_install(source=POLICY, note="ledger worker tests")
    with stub_llm_server() as llm:
        llm.usage = {"prompt_tokens": 30, "completion_tokens": 200}
        _hanging(llm, 60)
        doomed = start_worker("doomed", concurrency=1, **_llm_env(llm))
        run = run_submit(workflow="priced_chat", input={"prompt": PROMPT}).run
        wait_until(lambda: llm.requests, what="the first call to reach the endpoint")
        lost = _held(run.pk)
        assert lost is not None and lost.amount == WORST
        assert (_run_scope(run.pk).reserved, _run_scope(run.pk).spent) == (WORST, 0)

        doomed.kill()
        start_worker("rescuer", concurrency=1, **_llm_env(llm))
        # The lease (3 s in tests) expires; the engine's tick re-queues the step and releases.
        wait_until(
            lambda: recovery.engine_tick()["reaped"],
            timeout=10,
            interval=0.2,
            what="the lease to expire",
        )
        run = wait_for_run(run.pk)

    assert run.status == "succeeded", run.error_message
    assert len(llm.requests) == 2
    assert Step.objects.get(run=run, node="ask").attempt == 2
    first, second = Reservation.objects.filter(run_id=run.pk).order_by("pk")
    assert (first.pk, first.status, first.actual) == (lost.pk, ReservationStatus.RELEASED, None)
    assert (second.status, second.actual) == (ReservationStatus.SETTLED, ONE_CALL)
    for scope in (_run_scope(run.pk), SpendScope.objects.get(kind="global_day")):
        assert (scope.spent, scope.reserved) == (ONE_CALL, 0)
    [released] = AuditEvent.objects.filter(verb=Verb.RESERVATION_RELEASED, run_id=run.pk)
    assert released.object_id == str(lost.pk) and released.data["reason"] == "lease_expired"


def test_a_call_that_outlives_its_lost_lease_is_still_charged(start_worker: Any) -> None:
    """A worker frozen mid-call (SIGSTOP) loses its lease and its reservation; the retry runs
    elsewhere. When it wakes, its call completes too: both calls were paid for, so both are
    spent, and only the retry's result counts for the run."""
    policy_install(source=POLICY.replace("limit: 0.003", "limit: 1.00"), note="ledger worker tests")
    with stub_llm_server() as llm:
        llm.usage = {"prompt_tokens": 30, "completion_tokens": 200}
        _hanging(llm, 6)
        frozen = start_worker("frozen", concurrency=1, **_llm_env(llm))
        run = run_submit(workflow="priced_chat", input={"prompt": PROMPT}).run
        wait_until(lambda: llm.requests, what="the first call to reach the endpoint")
        lost = _held(run.pk)
        for pid in frozen.pids():
            os.kill(pid, signal.SIGSTOP)
        try:
            start_worker("rescuer", concurrency=1, **_llm_env(llm))
            wait_until(
                lambda: recovery.engine_tick()["reaped"],
                timeout=10,
                interval=0.2,
                what="the lease to expire",
            )
            run = wait_for_run(run.pk)
            assert Reservation.objects.get(pk=lost.pk).status == ReservationStatus.RELEASED
        finally:
            for pid in frozen.pids():
                os.kill(pid, signal.SIGCONT)
        late = wait_until(
            lambda: Reservation.objects.filter(
                pk=lost.pk, status=ReservationStatus.SETTLED
            ).first(),
            timeout=15,
            what="the woken worker's call to be charged",
        )

    assert run.status == "succeeded", run.error_message
    assert late.actual == ONE_CALL
    assert (_run_scope(run.pk).spent, _run_scope(run.pk).reserved) == (2 * ONE_CALL, 0)
    ask = Step.objects.get(run=run, node="ask")
    assert ask.attempt == 2
    assert AuditEvent.objects.filter(verb=Verb.STEP_SUCCEEDED, step_id=ask.pk).count() == 1


# --- a chained step's reservation, made in the transaction that claims it ------------------------

PRICED_CHAIN, CHAIN_WORST, CHAIN_CALL = PRICED, PRICED_WORST, PRICED_CALL


def _steps(run_id: int) -> dict[str, Step]:
    return {step.node: step for step in Step.objects.filter(run_id=run_id)}


def test_a_chained_step_is_reserved_by_the_commit_that_claims_it(start_worker: Any) -> None:
    # One reservation per call (budget blocks off): each call's reservation is made in the
    # transaction that claims its step.
    policy_install(source=PRICED_CHAIN % "1.00", note="ledger worker tests")
    start_worker("solo", concurrency=1, SIGNALBOX_CEILING_BLOCK_CALLS="1")
    run = wait_for_run(run_submit(workflow="priced_chain", input={"text": "t"}).run.pk)

    assert run.status == "succeeded", run.error_message
    steps = _steps(run.pk)
    held = {r.step_id: r for r in Reservation.objects.filter(run_id=run.pk).order_by("created_at")}
    assert [held[steps[n].pk].status for n in ("one", "two", "three")] == ["settled"] * 3
    assert all(r.amount == CHAIN_WORST and r.actual == CHAIN_CALL for r in held.values())
    assert {r.kind for r in held.values()} == {"call"}
    # "two" and "three" were reserved in the transaction that completed their predecessor and
    # claimed them (no transaction of their own): at that commit's time, to the microsecond.
    assert held[steps["two"].pk].created_at == steps["one"].finished_at
    assert held[steps["three"].pk].created_at == steps["two"].finished_at
    # "one" came from the broker, whose message said what its reservation needs: it was
    # reserved in the transaction that claimed it, at the claim's time.
    assert held[steps["one"].pk].created_at == steps["one"].started_at
    for scope in (_run_scope(run.pk), SpendScope.objects.get(kind="global_day")):
        assert (scope.spent, scope.reserved) == (3 * CHAIN_CALL, 0)


@pytest.mark.parametrize("together", [1, 8])
def test_a_chains_calls_share_one_budget_block_settled_once_the_run_is_done_with_it(
    start_worker: Any, together: int
) -> None:
    # The default: the worker reserves eight calls' worth when it claims "one" and takes "two"
    # and "three" from it in memory; each call is recorded with its step's completion. The
    # block is settled, for what the three calls cost, once the run's last completion leaves
    # it: with ``CEILING_SETTLE_TOGETHER`` = 1 in that completion's own transaction; by
    # default it waits (here alone, so for ``CEILING_SETTLE_SECONDS``) to be settled with others.
    policy_install(source=PRICED_CHAIN % "1.00", note="ledger worker tests")
    start_worker("solo", concurrency=1, SIGNALBOX_CEILING_SETTLE_TOGETHER=str(together))
    run = wait_for_run(run_submit(workflow="priced_chain", input={"text": "t"}).run.pk)

    assert run.status == "succeeded", run.error_message
    steps = _steps(run.pk)
    [block] = Reservation.objects.filter(run_id=run.pk, kind="block")
    wait_until(
        lambda: Reservation.objects.get(pk=block.pk).status == "settled", what="the settlement"
    )
    block.refresh_from_db()
    assert (block.amount, block.actual) == (8 * CHAIN_WORST, 3 * CHAIN_CALL)
    assert block.created_at == steps["one"].started_at  # in the claim from the broker
    if together == 1:
        assert block.settled_at == steps["three"].finished_at  # with the run's last completion
    else:
        assert block.settled_at > steps["three"].finished_at
    # Each call is recorded on its step's row, by the statement that completed the step: no
    # ledger row of its own.
    assert not Reservation.objects.filter(block_id=block.pk).exists()
    for node in ("one", "two", "three"):
        call = steps[node].block_call
        assert call is not None and call["block"] == block.pk
        assert (Decimal(call["worst"]), Decimal(call["cost"])) == (CHAIN_WORST, CHAIN_CALL)
    for scope in (_run_scope(run.pk), SpendScope.objects.get(kind="global_day")):
        assert (scope.spent, scope.reserved) == (3 * CHAIN_CALL, 0)


def test_a_workers_budget_blocks_are_settled_together_in_a_completions_transaction(
    start_worker: Any,
) -> None:
    # Three runs, one after the other, each leaving its block to wait; the third run's last
    # completion finds three waiting and settles them all in its own transaction: each scope
    # row moved once for the three, every amount exact.
    policy_install(source=PRICED_CHAIN % "1.00", note="ledger worker tests")
    start_worker(
        "solo",
        concurrency=1,
        SIGNALBOX_CEILING_SETTLE_TOGETHER="3",
        SIGNALBOX_CEILING_SETTLE_SECONDS="10",
    )
    runs = [
        wait_for_run(run_submit(workflow="priced_chain", input={"text": f"t{i}"}).run.pk)
        for i in range(3)
    ]
    assert [run.status for run in runs] == ["succeeded"] * 3
    last = _steps(runs[-1].pk)["three"]
    blocks = Reservation.objects.filter(kind="block").order_by("run_id")
    assert [(b.run_id, b.status, b.actual) for b in blocks] == [
        (run.pk, "settled", 3 * CHAIN_CALL) for run in runs
    ]
    assert {b.settled_at for b in blocks} == {last.finished_at}
    for run in runs:
        assert (_run_scope(run.pk).spent, _run_scope(run.pk).reserved) == (3 * CHAIN_CALL, 0)
    shared = SpendScope.objects.get(kind="global_day")
    assert (shared.spent, shared.reserved) == (9 * CHAIN_CALL, 0)
    assert shared.updated_at == last.finished_at


def test_a_worker_killed_mid_call_gives_its_budget_block_back_charging_the_calls_it_made(
    start_worker: Any,
) -> None:
    # "one" and "two" take from the block the doomed worker reserves with one's claim; it dies
    # in two's call. The reaper takes two's lease back and, with it, the block: released, with
    # one's call (recorded with one's completion) charged. The retry reserves afresh.
    policy_install(source=PRICED_CHAIN % "1.00", note="ledger worker tests")
    doomed = start_worker("doomed", concurrency=1)
    run = run_submit(workflow="priced_hang", input={"text": "t"}).run
    wait_until(
        lambda: Step.objects.filter(run_id=run.pk, node="two", status="running").exists(),
        what="two to start",
    )
    [block] = Reservation.objects.filter(run_id=run.pk, kind="block")
    assert (block.status, _run_scope(run.pk).reserved) == ("held", 8 * CHAIN_WORST)

    doomed.kill()
    start_worker("rescuer", concurrency=1)
    wait_until(lambda: recovery.engine_tick()["reaped"], timeout=10, interval=0.2, what="the lease")
    run = wait_for_run(run.pk)

    assert run.status == "succeeded", run.error_message
    block.refresh_from_db()
    assert (block.status, block.actual) == ("released", CHAIN_CALL)  # one's call, charged
    [released] = AuditEvent.objects.filter(verb=Verb.RESERVATION_RELEASED, object_id=str(block.pk))
    assert released.data["reason"] == "lease_expired"
    wait_until(  # the retry's own block, settled once the rescuer is done with it
        lambda: (
            not Reservation.objects.filter(run_id=run.pk, status=ReservationStatus.HELD).exists()
        ),
        what="the retry's block to be settled",
    )
    # Each completed attempt's call is on its step row ("one" with the doomed worker's block,
    # "two" and "three" with the rescuer's); the doomed block's release charged "one"'s.
    calls = {s.node: s.block_call for s in Step.objects.filter(run_id=run.pk)}
    assert calls["one"]["block"] == block.pk
    assert calls["two"]["block"] == calls["three"]["block"] != block.pk
    assert {Decimal(call["cost"]) for call in calls.values()} == {CHAIN_CALL}
    for scope in (_run_scope(run.pk), SpendScope.objects.get(kind="global_day")):
        assert (scope.spent, scope.reserved) == (3 * CHAIN_CALL, 0)


def test_a_chained_step_past_the_ceiling_is_refused_in_its_claim_and_escalates(
    start_worker: Any,
) -> None:
    # Room for "one" and "two" (0.00015 spent, 0.0003 asked: 0.00045), not for "three" (0.0003
    # spent, 0.0003 asked: 0.0006). "three" is pure, so it starts before the answer to its
    # reservation is read; that answer is a refusal, and its result is dropped.
    policy_install(source=PRICED_CHAIN % "0.0005", note="ledger worker tests")
    start_worker("solo", concurrency=1)
    run = run_submit(workflow="priced_chain", input={"text": "t"}).run
    wait_until(
        lambda: Wait.objects.filter(run_id=run.pk, kind="escalation", status="open").exists(),
        what="the ceiling's escalation",
    )

    steps = _steps(run.pk)
    assert (steps["one"].status, steps["two"].status) == ("succeeded", "succeeded")
    three = steps["three"]
    assert three.error_code == Code.CEILING_EXCEEDED and three.output is None
    assert "run ceiling" in three.error_message and str(CHAIN_WORST) in three.error_message
    assert not Reservation.objects.filter(run_id=run.pk, step_id=three.pk).exists()
    assert not Reservation.objects.filter(run_id=run.pk, status=ReservationStatus.HELD).exists()
    assert (_run_scope(run.pk).spent, _run_scope(run.pk).reserved) == (2 * CHAIN_CALL, 0)
