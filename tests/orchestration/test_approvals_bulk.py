"""Bulk decisions under concurrency, on PostgreSQL with real connections: two operators'
bulk calls over the same approvals, at the same moment. Each approval is decided exactly once,
the other call is told who decided it, and neither waits for the other forever (approvals are
closed in run order in one transaction, so their run locks are taken in the same order)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from django.db import connection

from audit.models import AuditEvent
from audit.verbs import Verb
from orchestration.models import Run, Wait
from orchestration.services import BulkOutcome, approvals_decide_bulk, run_submit
from tests.conftest import OPERATOR_PERMISSIONS
from tests.factories import UserFactory

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _quiet(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}
    monkeypatch.setattr("orchestration.dispatch.publish", lambda steps, rt, **_: None)


def _approvals(drive: Any, n: int) -> list[Wait]:
    waits = []
    for _ in range(n):
        run = run_submit(workflow="reference_workload", input={"needs_approval": True}).run
        drive(run.pk)
        waits.append(Wait.objects.get(run=run, kind="approval", status="open"))
    return waits


def _at_once(calls: list[tuple[Any, list[int]]]) -> list[list[BulkOutcome]]:
    """Each (user, ids) as a bulk approval in a thread of its own, started together."""
    barrier = threading.Barrier(len(calls))
    results: list[list[BulkOutcome]] = [[] for _ in calls]
    errors: list[BaseException] = []

    def decide(i: int, user: Any, ids: list[int]) -> None:
        try:
            barrier.wait()
            results[i] = approvals_decide_bulk(wait_ids=ids, user=user, reason=f"call {i}")
        except BaseException as exc:  # a deadlock, or anything else: the test reports it
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=decide, args=(i, user, ids)) for i, (user, ids) in enumerate(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a bulk decision did not finish"
    assert not errors, errors
    return results


@pytest.mark.parametrize("round_", range(3))
def test_two_bulk_decisions_over_the_same_approvals_decide_each_exactly_once(
    drive: Any, round_: int
) -> None:
    first = UserFactory(username="first", permissions=OPERATOR_PERMISSIONS)
    second = UserFactory(username="second", permissions=OPERATOR_PERMISSIONS)
    waits = [w.pk for w in _approvals(drive, 10)]
    # Overlapping in the middle, and asked in opposite orders.
    mine, theirs = waits[:7], waits[3:][::-1]
    one, other = _at_once([(first, mine), (second, theirs)])

    assert [o.wait_id for o in one] == mine and [o.wait_id for o in other] == theirs
    won = Counter(o.wait_id for o in [*one, *other] if o.ok)
    assert won == dict.fromkeys(waits, 1)  # every approval decided, none twice
    rows = {w.pk: w for w in Wait.objects.filter(pk__in=waits).select_related("decided_by")}
    for outcome in [*one, *other]:
        if outcome.ok:
            continue
        # The loser is told who decided it, and when.
        assert outcome.code == "already_decided"
        winner = rows[outcome.wait_id].decided_by.username
        assert f"approve by {winner} at " in outcome.message
        assert winner != ("first" if outcome in one else "second")
    assert {w.status for w in rows.values()} == {"approved"}
    approved = Counter(
        AuditEvent.objects.filter(
            verb=Verb.APPROVAL_APPROVED, run_id__in=[w.run_id for w in rows.values()]
        ).values_list("run_id", flat=True)
    )
    assert set(approved.values()) == {1} and len(approved) == len(waits)
    for wait in rows.values():
        assert drive(wait.run_id).status == "succeeded"
    assert (
        not Run.objects.filter(pk__in=[w.run_id for w in rows.values()])
        .exclude(status="succeeded")
        .exists()
    )
