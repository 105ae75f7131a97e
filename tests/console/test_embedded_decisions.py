"""Decisions through the REST API on the embedded database (SQLite, the plain store), in a
process of its own: one call, a bulk call over several runs, two approvals of one run in one
bulk call, and a second decision of the same approval."""

from __future__ import annotations

import json

from tests.support.embedded import embedded_manage

SCRIPT = """
import json
from django.test import Client
from django.utils import timezone
from console.models import ApiToken
from orchestration.models import Run, Step, Wait
from orchestration.services import run_submit
from policies.active import active_forget
from policies.services import policy_install
from tests.conftest import ALL_POOLS, OPERATOR_PERMISSIONS
from tests.factories import UserFactory
from tests.support.engine import step_execute

operator = UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)
_, token = ApiToken.issue(operator, "cli")
client = Client(HTTP_AUTHORIZATION="Bearer " + token)

def drive(run_id):
    for _ in range(50):
        queued = list(Step.objects.filter(run_id=run_id, status="queued", available_at__lte=timezone.now()).values_list("pk", flat=True))
        if not queued:
            break
        for step_id in queued:
            step_execute(step_id, worker_id="t", pools=ALL_POOLS)
    return Run.objects.get(pk=run_id)

def waiting(input):
    run = run_submit(workflow="reference_workload", input=input).run
    drive(run.pk)
    return run.pk, list(Wait.objects.filter(run_id=run.pk, status="open").order_by("pk").values_list("pk", flat=True))

def post(path, body):
    response = client.post("/api/v1/approvals" + path, body, content_type="application/json")
    return response.status_code, response.json()

# In force before the runs start: a run is bound to the policy version its approvals asked.
policy_install(source='''
default: allow
rules:
  - id: research-needs-a-person
    description: Each research branch needs a tier-1 approval
    action: agent:noop
    workflow: reference_workload
    when:
      - {fact: node, op: in, value: [research_a, research_b]}
      - {fact: params.topic, op: "==", value: twins}
    outcome: {decision: require_approval, tier: 1, sla: 1h}
''')
active_forget()
single_run, (single,) = waiting({"needs_approval": True})
runs, bulk = zip(*[waiting({"needs_approval": True}) for _ in range(3)])
twin_run, twin = waiting({"topic": "twins"})

one = post(f"/{single}/decide", {"decision": "approve", "reason": "ok"})
again = post(f"/{single}/decide", {"decision": "approve", "reason": "twice"})
ids = [w for (w,) in bulk] + twin[::-1] + [single]
many = post("/decide", {"ids": ids, "decision": "approve", "reason": "batch"})
duplicates = post("/decide", {"ids": [single, single], "decision": "approve"})
print(json.dumps({
    "one": one[0],
    "again": [again[0], again[1]["error"]["code"]],
    "many": [many[0], [[o["ok"], o["code"]] for o in many[1]]],
    "duplicates": duplicates[0],
    "runs": [drive(r).status for r in [single_run, *runs, twin_run]],
    "approved": Wait.objects.filter(status="approved").count(),
}))
"""


def test_decisions_on_the_embedded_database(tmp_path):
    manage = embedded_manage(tmp_path)

    manage("migrate", "-v0")
    outcome = json.loads(manage("shell", stdin=SCRIPT).strip().splitlines()[-1])
    assert outcome == {
        "one": 200,
        "again": [409, "already_decided"],
        "many": [200, [[True, ""]] * 5 + [[False, "already_decided"]]],
        "duplicates": 422,
        "runs": ["succeeded"] * 5,
        "approved": 6,
    }
