"""Which groups a transaction's live events go to (orchestration.live.messages_for): the run's
own, the run list on a run's status change, the inbox on a claim or an item opening."""

from __future__ import annotations

from typing import Any

from orchestration.live import INBOX_GROUP, RUNS_GROUP, messages_for


def groups(*events: dict[str, Any]) -> list[str]:
    return [group for group, _ in messages_for([{"run_id": 7, **e} for e in events])]


def test_the_inbox_hears_claims_and_items_opening_but_not_every_step() -> None:
    assert groups({"kind": "claim", "wait_id": 1}) == ["run-7", INBOX_GROUP]
    assert groups({"kind": "step", "status": "waiting"}) == ["run-7", INBOX_GROUP]
    assert groups({"kind": "step", "status": "queued"}, {"kind": "step", "status": "running"}) == [
        "run-7"
    ]


def test_the_run_list_hears_only_a_runs_own_status() -> None:
    assert groups({"kind": "run", "status": "waiting"}) == ["run-7", RUNS_GROUP]
