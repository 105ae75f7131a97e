"""The ledger on the embedded database (SQLite), in a process of its own: the same conditional
UPDATE reserves, refuses past the ceiling, settles and releases; a block's call is recorded and
the block's settlement charges it."""

from __future__ import annotations

import json
from decimal import Decimal

from tests.support.embedded import embedded_manage

SCRIPT = """
import json
from datetime import timedelta
from decimal import Decimal
from policies.errors import CeilingExceeded
from policies.ledger import ceiling_release, ceiling_reserve, ceiling_settle
from policies.limits import CeilingScope
from policies.models import SpendScope

scopes = [CeilingScope("run", "1", Decimal("1"), Decimal("0.8")), CeilingScope("global_day", "", Decimal("5"), Decimal("0.8"))]
def reserve(amount):
    return ceiling_reserve(scopes=scopes, amount=Decimal(amount), run_id=1, step_id=1, action="agent:x", owner="w",
                           ttl=timedelta(minutes=5))
held = [reserve("0.3") for _ in range(3)]
try:
    reserve("0.2")
    refused = None
except CeilingExceeded as exc:
    refused = exc.detail["kind"]
ceiling_settle(held[0].pk, Decimal("0.1"))
ceiling_release(held[1].pk)
# The third as an engine writes it with a step's completion, in its transaction.
from django.db import connection, transaction
from django.utils import timezone
from policies.ledger import Settlement, settlement_statements
with transaction.atomic(), connection.cursor() as cursor:
    for sql, params in settlement_statements(Settlement.of(held[2], Decimal("0.05")), timezone.now()):
        cursor.execute(sql, params)
# A block of several calls: one call made from it, recorded, then the block settled.
from policies.blocks import Block
from policies.ledger import settlement_apply
block = Block(ceiling_reserve(scopes=scopes, amount=Decimal("0.5"), run_id=1, step_id=2,
                              action="agent:x", owner="w", ttl=timedelta(minutes=5), kind="block",
                              most=Decimal("2")))  # no room for 2: one call's worth
assert block.take(Decimal("0.2"), timezone.now(), timedelta(seconds=30))
settlement_apply(block.spend(step_id=2, action="agent:x", worst=Decimal("0.2"),
                             actual=Decimal("0.1")))
held_by_block = str(SpendScope.objects.get(kind="run").reserved)
settlement_apply(block.settlement())
run = SpendScope.objects.get(kind="run")
print(json.dumps({"refused": refused, "spent": str(run.spent), "reserved": str(run.reserved),
                  "held_by_block": held_by_block}))
"""


def test_the_ledger_on_the_embedded_database(tmp_path):
    manage = embedded_manage(tmp_path)

    manage("migrate", "-v0")
    outcome = json.loads(manage("shell", stdin=SCRIPT).strip().splitlines()[-1])
    assert outcome["refused"] == "run"
    # SQLite keeps decimals as floats: compared to the cent's millionth.
    assert abs(Decimal(outcome["held_by_block"]) - Decimal("0.5")) < Decimal("0.000001")
    # 0.1 + 0.05 from single calls, 0.1 from the block's one call.
    assert abs(Decimal(outcome["spent"]) - Decimal("0.25")) < Decimal("0.000001")
    assert abs(Decimal(outcome["reserved"])) < Decimal("0.000001")
