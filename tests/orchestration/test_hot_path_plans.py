"""The hot path's prepared statements find their rows by primary key, whatever the tables'
statistics say.

A worker prepares its statements once per connection, and PostgreSQL keeps the generic plan it
makes after a few executions for the connection's life. Made while a table is new (no
statistics, a page or none), such a plan once scanned the whole partial index of queued or
running steps, or of held reservations, for every claim, fence and settlement (the index's
predicate matched the statement's status, and the id was filtered afterwards), and scanned the
table of spend scopes for every reservation: tens of rows read per row written, more the longer
the worker ran. Here each statement the engine prepared while it ran a run under a policy with
ceilings, and while an approval was decided, is planned as a worker would plan it, against tables as empty as a new installation's.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection

from orchestration.models import Wait
from orchestration.services import approval_decide, run_submit
from policies.active import active_forget
from policies.services import policy_install
from tests.conftest import OPERATOR_PERMISSIONS
from tests.factories import UserFactory
from tests.support.agents import EchoAgent

pytestmark = [pytest.mark.django_db(transaction=True)]

if connection.vendor != "postgresql":  # pragma: no cover - the suite runs on PostgreSQL
    pytest.skip("prepared statements are PostgreSQL-only", allow_module_level=True)

POLICY = """
default: allow
ceilings:
  - {scope: run, limit: 1.00}
  - {scope: workflow_day, limit: 10.00}
  - {scope: tenant_month, limit: 50.00}
  - {scope: global_day, limit: 10.00}
prices:
  known-model: {input_per_1k: 0.001, output_per_1k: 0.002}
  demo-model: {input_per_1k: 0.00015, output_per_1k: 0.0006}
"""

#: Tables that grow with the work: a statement that touches one row of them must not read more.
GROWING = (
    "orchestration_step",
    "orchestration_run",
    "orchestration_wait",
    "policies_reservation",
    "policies_spendscope",
)
#: Partial indexes of every row in one status: read whole, they are a scan of that status.
STATUS_INDEXES = (
    "step_queued_idx",
    "step_running_idx",
    "reservation_held_idx",
    "wait_open_due_idx",
)


@pytest.fixture
def priced_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    original = EchoAgent.run

    def run(self: EchoAgent, input: Any, ctx: Any) -> Any:
        ctx.report_usage(prompt_tokens=100, completion_tokens=50, model="known-model")
        return original(self, input, ctx)

    monkeypatch.setattr(EchoAgent, "model", "known-model")
    monkeypatch.setattr(EchoAgent, "run", run)


def _generic_plans() -> dict[str, str]:
    """Each statement prepared on this connection, as a worker's generic plan of it."""
    plans = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT name, statement, cardinality(parameter_types) FROM pg_prepared_statements"
        )
        prepared = cursor.fetchall()
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        try:
            for name, statement, arity in prepared:
                args = ", ".join(["NULL"] * arity)
                cursor.execute(f"EXPLAIN EXECUTE {name}({args})")
                plan = "\n".join(row[0] for row in cursor.fetchall())
                plans[statement.split(" AS ", 1)[1].strip()] = plan
        finally:
            cursor.execute("RESET plan_cache_mode")
    return plans


def _offences(plan: str) -> list[str]:
    found = []
    for line in plan.splitlines():
        seq = re.search(r"Seq Scan on (\w+)", line)
        if seq and seq.group(1) in GROWING:
            found.append(line.strip())
        index = re.search(r"Index (?:Only )?Scan using (\w+)", line)
        if index and index.group(1) in STATUS_INDEXES:
            found.append(line.strip())
    return found


def test_every_prepared_statement_of_a_run_under_ceilings_reads_its_rows_by_key(
    priced_echo: None, drive: Any, fast_agents: None
) -> None:
    policy_install(source=POLICY, note="plans")
    active_forget()
    run = drive(run_submit(workflow="siblings", input={"text": "t"}).run.pk)
    assert run.status == "succeeded"
    # and again, so that the statements a second run finds prepared are the ones planned
    assert drive(run_submit(workflow="siblings", input={"text": "u"}).run.pk).status == "succeeded"
    # an approval decided, and the run it released finished
    paused = run_submit(workflow="reference_workload", input={"needs_approval": True}).run
    drive(paused.pk)
    wait = Wait.objects.get(run=paused, kind="approval", status="open")
    operator = UserFactory(permissions=OPERATOR_PERMISSIONS)
    approval_decide(wait_id=wait.pk, user=operator, decision="approve", reason="plans")
    assert drive(paused.pk).status == "succeeded"

    plans = _generic_plans()
    statements = " ".join(plans)
    # what this test is about was prepared: claims, fences, reservations and settlements
    for table in (
        "orchestration_step",
        "orchestration_wait",
        "policies_reservation",
        "policies_spendscope",
    ):
        assert table in statements, f"no prepared statement touches {table}"
    bad = {statement: _offences(plan) for statement, plan in plans.items() if _offences(plan)}
    assert not bad, "\n\n".join(f"{s[:300]}…\n  " + "\n  ".join(lines) for s, lines in bad.items())
