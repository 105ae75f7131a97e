"""The embedded demo: users seeded once, the command's refusal outside embedded mode, and the
simulator's single pass."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from itertools import pairwise
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.utils import timezone

from console.demo import DEMO_USERS, OPENING, DemoSimulator, demo_policy_install, demo_users_seed
from orchestration.models import RUN_ACTIVE, Run, Step, Wait, WaitKind, WaitStatus
from orchestration.selectors import home_counts_for_user
from orchestration.services import approval_decide, run_submit
from policies.models import SpendScope, Tenant

pytestmark = pytest.mark.django_db


def test_seeding_creates_users_and_groups_once() -> None:
    users = get_user_model().objects
    first = demo_users_seed()

    assert set(first.created) == set(DEMO_USERS)
    assert set(DEMO_USERS) == {"trainee", "operator", "lead", "lead2", "admin", "admin2", "auditor"}
    assert all(len(password) >= 16 for password in first.created.values())
    assert len(set(first.created.values())) == len(DEMO_USERS)
    assert set(first.groups_created) == {
        "Operator tier 1",
        "Operator tier 2",
        "Operator tier 3",
        "Policy admin",
        "Auditor",
    }
    assert first.existing == []
    # The simulator's service account exists, and cannot log in.
    assert not users.get(username="simulator").has_usable_password()

    counts = (users.count(), Group.objects.count())
    second = demo_users_seed()
    assert second.created == {}
    assert second.groups_created == []
    assert set(second.existing) == set(DEMO_USERS)
    assert (users.count(), Group.objects.count()) == counts
    # Passwords were left alone.
    for name, password in first.created.items():
        assert users.get(username=name).check_password(password)


def test_seeded_roles_have_their_permissions() -> None:
    demo_users_seed()
    users = get_user_model().objects
    operator, admin, auditor = (users.get(username=n) for n in ("operator", "admin", "auditor"))
    trainee, lead, lead2 = (users.get(username=n) for n in ("trainee", "lead", "lead2"))
    # Tiers 1 to 3, and two people at tier 3: refunds above 10,000 need two approvers.
    assert trainee.has_perm("orchestration.decide_tier_1") and not trainee.has_perm(
        "orchestration.decide_tier_2"
    )
    assert all(u.has_perm("orchestration.decide_tier_3") for u in (lead, lead2))

    acme = Tenant.objects.get(slug="acme")
    # The operator decides up to tier 2, for the demo tenants.
    for perm in ("decide_run", "decide_tier_1", "decide_tier_2"):
        assert operator.has_perm(f"orchestration.{perm}")
    assert not operator.has_perm("orchestration.decide_tier_3")
    assert operator.has_perm("policies.decide_runs", acme) and operator.has_perm(
        "policies.view_runs", acme
    )
    assert not operator.has_perm("orchestration.delete_run")
    # The admin edits and reviews policies, and reaches the Django admin; decides nothing.
    assert admin.has_perm("policies.edit_policy") and admin.has_perm("policies.review_policy")
    assert admin.is_staff and not admin.is_superuser
    assert not admin.has_perm("orchestration.decide_run")
    # The auditor reads everything and changes nothing.
    assert auditor.has_perm("orchestration.view_run")
    assert not auditor.has_perm("orchestration.decide_run")
    assert not auditor.has_perm("orchestration.add_run")
    assert not auditor.has_perm("policies.edit_policy")
    assert not any(u.is_superuser for u in (operator, admin, auditor))


def test_demo_refuses_to_run_against_external_services(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgres://example/db")
    with pytest.raises(CommandError, match=r"DATABASE_URL.*--allow-external"):
        call_command("demo")
    assert not get_user_model().objects.filter(username="operator").exists()


@pytest.fixture
def simulator() -> DemoSimulator:
    demo_users_seed()
    service = get_user_model().objects.get(username="simulator")
    return DemoSimulator(user=service, rng=random.Random(3), reject_share=0.0, auto_decide=True)


def test_simulator_opens_with_one_of_each_kind_then_slows_down(simulator: DemoSimulator) -> None:
    now = timezone.now()
    submitted, at = [], []
    for second in range(0, 240):
        done = simulator.tick(now + timedelta(seconds=second)).submitted
        submitted += done
        at += [second] * len(done)
    assert [simulator.scenarios[pk] for pk in submitted[: len(OPENING)]] == list(OPENING)
    workflows = {run.workflow_name for run in Run.objects.filter(pk__in=submitted)}
    assert workflows == {"content_pipeline", "refund_desk", "research_brief"}
    # As the simulator's service account, never as a person who decides.
    assert {run.submitted_by.username for run in Run.objects.filter(pk__in=submitted)} == {
        "simulator"
    }
    # Every 3 to 6 seconds during the opening (about a minute), then every 8 to 15.
    gaps = [later - earlier for earlier, later in pairwise(at)]
    assert all(3 <= gap <= 7 for gap in gaps[: len(OPENING) - 1])
    assert gaps[len(OPENING) :] and all(8 <= gap <= 16 for gap in gaps[len(OPENING) :])


def test_simulator_stops_submitting_at_the_active_limit(simulator: DemoSimulator) -> None:
    simulator.max_active = 2
    now = timezone.now()
    for seconds in range(0, 100, 10):
        simulator.tick(now + timedelta(seconds=seconds))
    assert Run.objects.count() == 2


def test_simulator_stops_submitting_while_enough_items_wait_for_people(
    drive: Callable[[int], Run],
) -> None:
    demo_users_seed()
    service = get_user_model().objects.get(username="simulator")
    simulator = DemoSimulator(user=service, rng=random.Random(3), max_open_items=2)
    open_items = Wait.objects.filter(status=WaitStatus.OPEN, kind__in=("approval", "escalation"))
    now = timezone.now()
    runs_when_full = None
    for second in range(0, 240, 2):
        simulator.tick(now + timedelta(seconds=second))
        drive_active(drive)
        if runs_when_full is None and open_items.count() >= 2:
            runs_when_full = Run.objects.count()
    # Once two items wait for a person, nothing new comes however long nobody answers.
    assert runs_when_full is not None and runs_when_full < len(OPENING)
    assert Run.objects.count() == runs_when_full
    open_items.filter(kind="approval").update(status=WaitStatus.CANCELLED)
    assert simulator.tick(now + timedelta(seconds=300)).submitted


def test_simulator_settles_refunds_and_decides_stale_approvals(
    simulator: DemoSimulator, drive: Callable[[int], Run]
) -> None:
    service = simulator.user
    refund = run_submit(
        workflow="refund_desk",
        input={
            "message": "My chair arrived damaged, I want a refund.",
            "order_id": "ord_1",
            "customer_id": "cus_1",
        },
        submitted_by=service,
        seed=11,
    ).run
    drive(refund.pk)
    approval = Wait.objects.filter(
        run=refund, kind=WaitKind.APPROVAL, status=WaitStatus.OPEN
    ).first()
    if approval is not None:  # refunds above the threshold need a person first
        approval_decide(wait_id=approval.pk, user=None, decision="approve")
        drive(refund.pk)
    assert Wait.objects.filter(run=refund, kind=WaitKind.EVENT, status=WaitStatus.OPEN).exists()

    content = drive(
        run_submit(workflow="content_pipeline", input={}, submitted_by=service, seed=5).run.pk
    )
    assert content.status == "waiting"

    # A second later nothing is due: settlement takes a few seconds, approvals are for people.
    simulator.max_active = 0
    early = simulator.tick(timezone.now() + timedelta(seconds=1))
    assert early.settled == [] and early.decided == []

    late = simulator.tick(timezone.now() + timedelta(minutes=3))
    assert late.settled == [refund.pk]
    assert len(late.decided) == 1
    drive(refund.pk)
    drive(content.pk)
    refund.refresh_from_db()
    content.refresh_from_db()
    assert refund.status == "succeeded"
    assert refund.state["settlement"]["status"] == "settled"
    assert content.status == "succeeded"
    decided = Wait.objects.get(pk=late.decided[0])
    assert decided.decision == "approve" and decided.decided_by is None
    assert "demo simulator" in decided.decision_reason


def test_simulator_pass_is_quiet_when_everything_is_decided(simulator: Any) -> None:
    simulator.max_active = 0
    assert simulator.tick().submitted == []


def test_simulator_retries_escalations_nobody_answered(
    simulator: Any, drive: Callable[[int], Run]
) -> None:
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    escalation = Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)
    simulator.max_active = 0
    assert simulator.tick(timezone.now() + timedelta(seconds=1)).retried == []  # for people first
    late = simulator.tick(timezone.now() + timedelta(minutes=3))
    assert late.retried == [escalation.pk]
    escalation.refresh_from_db()
    assert escalation.decision == "retry" and escalation.decided_by is None
    assert "demo simulator" in escalation.decision_reason
    step = Step.objects.get(run=run, node="act")
    assert step.status == "queued"
    # The retry fails the same way: the second time, the simulator gives the run up.
    drive(run.pk)
    second = Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)
    assert simulator.tick(timezone.now() + timedelta(minutes=6)).retried == [second.pk]
    second.refresh_from_db()
    assert second.decision == "abort" and "aborted by the demo simulator" in second.decision_reason
    run.refresh_from_db()
    assert run.status not in ("queued", "running", "waiting")


def test_simulator_leaves_decisions_to_people_by_default(drive: Callable[[int], Run]) -> None:
    demo_users_seed()
    service = get_user_model().objects.get(username="simulator")
    quiet = DemoSimulator(user=service, rng=random.Random(3))
    content = drive(
        run_submit(workflow="content_pipeline", input={}, submitted_by=service, seed=5).run.pk
    )
    assert content.status == "waiting"
    late = quiet.tick(timezone.now() + timedelta(hours=1))
    assert late.decided == [] and late.retried == []
    assert Wait.objects.filter(run=content, kind=WaitKind.APPROVAL, status=WaitStatus.OPEN).exists()


def drive_active(drive: Callable[[int], Run]) -> None:
    """Run every queued step of every active run, as the demo's worker threads would."""
    for run_id in Run.objects.filter(status__in=RUN_ACTIVE).values_list("pk", flat=True):
        drive(run_id)


def test_demo_traffic_brings_every_kind_of_item_within_two_minutes(
    drive: Callable[[int], Run],
) -> None:
    demo_users_seed()
    demo_policy_install()
    users = get_user_model().objects
    simulator = DemoSimulator(user=users.get(username="simulator"), rng=random.Random(7))
    start = timezone.now()
    submitted_at: list[int] = []
    for second in range(0, 150):  # two and a half minutes of the simulator's clock
        done = simulator.tick(start + timedelta(seconds=second))
        if done.submitted:
            submitted_at.append(second)
        drive_active(drive)

    runs = Run.objects.filter(pk__in=simulator.scenarios)
    # The opening first, then a calmer pace: nobody drowns.
    assert [simulator.scenarios[pk] for pk in sorted(simulator.scenarios)][: len(OPENING)] == list(
        OPENING
    )
    assert len(submitted_at) <= len(OPENING) + 150 // 8
    # All of it submitted by the simulator's own service account, never by a person who decides.
    assert set(runs.values_list("submitted_by__username", flat=True)) == {"simulator"}

    open_waits = Wait.objects.filter(status=WaitStatus.OPEN)
    # Approvals at every tier (refunds across 100, 1,000 and 10,000; publishing at tier 1).
    approval_tiers = set(open_waits.filter(kind=WaitKind.APPROVAL).values_list("tier", flat=True))
    assert approval_tiers == {1, 2, 3}
    first = {name: pk for pk, name in sorted(simulator.scenarios.items(), reverse=True)}
    tier_3 = open_waits.get(kind=WaitKind.APPROVAL, run_id=first["refund_tier_3"])
    assert tier_3.quorum == 2 and tier_3.policy_rule == "refund-tier-3"
    # Escalations of each kind, each on the run of the scenario that makes it.
    escalations = {
        name: open_waits.get(kind=WaitKind.ESCALATION, run_id=first[name])
        for name in ("refund_archived", "refund_marketplace", "refund_long_thread")
    }
    archived = escalations["refund_archived"].action
    assert archived["why"] == "retries exhausted" and archived["node"] == "lookup_order"
    marketplace = escalations["refund_marketplace"].action
    assert marketplace["why"] == "contract violation" and marketplace["node"] == "propose_refund"
    ceiling = escalations["refund_long_thread"].action
    assert ceiling["error"]["code"] == "ceiling_exceeded" and ceiling["why"].startswith(
        "limit reached"
    )

    # The small refund waited for the payment provider's settlement, which came later.
    small = runs.get(pk=first["refund_small"])
    settlement = Wait.objects.get(run=small, kind=WaitKind.EVENT, name="payment.settled")
    assert settlement.status == WaitStatus.RECEIVED
    assert (settlement.payload or {}).get("status") == "settled"
    assert Step.objects.filter(run=small, node="settlement", status="succeeded").exists()

    # The home page counts each reason, and lists the run past its ceiling's warning share.
    home = home_counts_for_user(users.get(username="lead"))
    assert home.escalated_by_reason["retries exhausted"] >= 1
    assert home.escalated_by_reason["contract violation"] >= 1
    assert home.escalated_by_reason["ceiling hit"] >= 1
    assert escalations["refund_long_thread"].run_id in {row["run_id"] for row in home.near_ceiling}


def test_simulator_holds_back_a_workflow_near_its_daily_ceiling(simulator: DemoSimulator) -> None:
    demo_policy_install()
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    SpendScope.objects.create(
        kind="workflow_day",
        key="refund_desk",
        period_start=today,
        limit=Decimal("0.05"),
        spent=Decimal("0.0401"),
        updated_at=timezone.now(),
    )
    simulator._opening.clear()
    simulator.max_active = 1000  # nothing runs here: every submission stays active
    now = timezone.now()
    submitted = []
    for second in range(0, 300, 5):
        submitted += simulator.tick(now + timedelta(seconds=second)).submitted
    workflows = set(Run.objects.filter(pk__in=submitted).values_list("workflow_name", flat=True))
    # Past 80% of the refund desk's 0.05 a day: no refunds until tomorrow; the rest go on.
    assert workflows == {"content_pipeline", "research_brief"}
    SpendScope.objects.filter(key="refund_desk").update(spent=Decimal("0.0399"))
    more = []
    for second in range(300, 600, 5):
        more += simulator.tick(now + timedelta(seconds=second)).submitted
    assert "refund_desk" in set(
        Run.objects.filter(pk__in=more).values_list("workflow_name", flat=True)
    )
