"""The embedded demo's data: demo users and groups, and a simulator that keeps work flowing.

Both are plain functions and classes so tests call them directly; ``manage.py demo`` wires them
into threads (see ``console.embedded``).
"""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission, User
from django.db import transaction
from django.db.models import F
from django.utils import timezone

import policies
from orchestration.agents.demo.orders import OrderKind, order_id_of_kind
from orchestration.errors import SignalboxError
from orchestration.models import RUN_ACTIVE, Decision, Run, Wait, WaitKind, WaitStatus
from orchestration.selectors import approvals_pending_for_user
from orchestration.services import approval_decide, escalation_resolve, run_send_event, run_submit
from policies.ledger import period_start_for
from policies.models import ScopeKind, SpendScope, Tenant
from policies.roles import TENANT_OPERATOR, TENANT_SUBMITTER, roles_sync, tenant_grant
from policies.services import Installed, policy_install

log = logging.getLogger(__name__)

# --- users ----------------------------------------------------------------------------------------

#: Demo username -> its standard role (``policies.roles``), whether it is staff (the Django
#: admin), and what it does on the demo tenants.
DEMO_USERS: dict[str, tuple[str, bool, list[str]]] = {
    "trainee": ("Operator tier 1", False, TENANT_OPERATOR),
    "operator": ("Operator tier 2", False, TENANT_OPERATOR),
    # Refunds above 10,000 need two distinct tier-3 approvers.
    "lead": ("Operator tier 3", False, TENANT_OPERATOR),
    "lead2": ("Operator tier 3", False, TENANT_OPERATOR),
    "admin": ("Policy admin", True, []),
    "admin2": ("Policy admin", True, []),
    "auditor": ("Auditor", False, []),
}
#: The simulator submits as this service account (never as a person who decides).
SIMULATOR_USER = "simulator"
#: Demo tenants: slug -> (name, time zone).
DEMO_TENANTS: dict[str, tuple[str, str]] = {
    "acme": ("Acme Retail", "Europe/Berlin"),
    "globex": ("Globex Outfitters", "America/New_York"),
}


@dataclass
class DemoSeed:
    """What a seeding pass did: the passwords of users it created (shown once), and the rest."""

    created: dict[str, str] = field(default_factory=dict)
    existing: list[str] = field(default_factory=list)
    groups_created: list[str] = field(default_factory=list)


def demo_users_seed() -> DemoSeed:
    """Create the standard roles, the demo tenants, users and the simulator's service account,
    once. Existing users are left alone (passwords too)."""
    seed = DemoSeed()
    user_model = get_user_model()
    with transaction.atomic():
        before = set(Group.objects.values_list("name", flat=True))
        groups = roles_sync()
        seed.groups_created = [name for name in groups if name not in before]
        tenants = [
            Tenant.objects.get_or_create(slug=slug, defaults={"name": name, "time_zone": zone})[0]
            for slug, (name, zone) in DEMO_TENANTS.items()
        ]
        tenants.append(Tenant.objects.get(slug=settings.SIGNALBOX["DEFAULT_TENANT"]))
        for username, (role, staff, on_tenants) in DEMO_USERS.items():
            if user_model.objects.filter(username=username).exists():
                seed.existing.append(username)
                continue
            password = secrets.token_urlsafe(12)
            # An address, so notifications of the items they may decide reach them (in the
            # embedded demo, as files under var/mail/).
            user = user_model.objects.create_user(
                username=username,
                email=f"{username}@example.com",
                password=password,
                is_staff=staff,
            )
            user.groups.add(groups[role])
            for tenant in tenants:
                tenant_grant(user, tenant, on_tenants)
            seed.created[username] = password
        if not user_model.objects.filter(username=SIMULATOR_USER).exists():
            # A service account: it cannot log in, and it only submits.
            service = user_model.objects.create_user(username=SIMULATOR_USER, password=None)
            service.user_permissions.add(
                Permission.objects.get(content_type__app_label="orchestration", codename="add_run")
            )
            for tenant in tenants:
                tenant_grant(service, tenant, TENANT_SUBMITTER)
    return seed


def demo_policy_install() -> Installed:
    """The demo's policy (``policies/demo_policy.yaml``) in force, if no policy is yet."""
    source = (Path(policies.__file__).parent / "demo_policy.yaml").read_text()
    return policy_install(source=source, note="the demo's starting policy")


# --- simulated traffic ------------------------------------------------------------------------------

TOPICS = (
    "Why durable execution matters for AI agent workflows",
    "Designing approval gates that operators trust",
    "Cost ceilings for LLM-backed services",
    "What a tamper-evident audit trail buys you",
    "Retry storms and how bounded retries stop them",
    "Hub-and-spoke orchestration versus agent swarms",
    "Typed handoffs between agents",
)
AUDIENCES = ("engineering leads", "platform teams", "support managers", "CTOs")
#: Messages that ask for the whole order back (the proposer refunds all of it).
REFUND_MESSAGES = (
    "My headset arrived damaged. I would like a refund, please.",
    "The desk chair I ordered is broken, I want my money back.",
    "You sent the wrong item, I would like to return it for a refund.",
    "Everything in this delivery arrived damaged. Please refund the order.",
)
QUESTION_MESSAGES = (
    "When will my order ship?",
    "Can I change the delivery address on my order?",
    "Do you ship to Norway, and how long does it take?",
)
QUESTIONS = (
    "How should a team adopt durable orchestration for AI agents?",
    "What does it cost to run an agent fleet in production?",
    "How do teams audit decisions made by AI agents?",
    "When should a human approve an agent's action?",
    "How do you test multi-agent systems before release?",
)
SETTLEMENT_EVENT = "payment.settled"
#: How many earlier messages a customer pastes below a refund request in the long-thread case:
#: enough text (about 36,000 characters) that reading it costs more than the refund desk's run
#: ceiling in the demo policy allows, so the run stops at its next model call.
LONG_THREAD_MESSAGES = 130


@dataclass(frozen=True)
class Scenario:
    """One kind of demo work, and what an operator will see of it."""

    workflow: str
    shows: str
    #: For refunds: the kind of order (``orchestration.agents.demo.orders``).
    order: OrderKind | None = None


SCENARIOS: dict[str, Scenario] = {
    "content": Scenario("content_pipeline", "a tier-1 approval to publish"),
    "refund_small": Scenario(
        "refund_desk",
        "a refund of 100 or less: no approval; waits for the payment provider's settlement "
        "(an outside event the simulator sends later), then resumes",
        "small",
    ),
    "refund_tier_1": Scenario(
        "refund_desk",
        "a refund above 100: tier-1 approval (tier 2 outside business hours)",
        "consumer",
    ),
    "refund_tier_2": Scenario("refund_desk", "a refund above 1,000: tier-2 approval", "business"),
    "refund_tier_3": Scenario(
        "refund_desk", "a refund above 10,000: tier-3 approval by two people", "enterprise"
    ),
    "refund_archived": Scenario(
        "refund_desk",
        "an archived order whose lookups time out: retries exhausted, escalated",
        "archived",
    ),
    "refund_marketplace": Scenario(
        "refund_desk",
        "a marketplace order without a currency: contract violation, escalated",
        "marketplace",
    ),
    "refund_long_thread": Scenario(
        "refund_desk",
        "a customer pastes a long thread: the run's cost ceiling is hit, escalated",
        "small",
    ),
    "question": Scenario("refund_desk", "a customer question, answered without a person"),
    "research": Scenario("research_brief", "a research brief, done without a person"),
}
#: The first submissions, one after the other: within a minute or two a new operator has every
#: kind of item to handle (approvals of each tier, each kind of escalation, an event wait).
OPENING = (
    "content",
    "refund_small",
    "refund_tier_2",
    "refund_archived",
    "refund_long_thread",
    "refund_tier_3",
    "refund_marketplace",
    "refund_tier_1",
    "research",
    "question",
)
#: After the opening, how often each kind comes: about six in ten submissions leave an item for
#: a person, so at one submission every ten seconds or so an operator gets a few a minute.
MIX: dict[str, int] = {
    "content": 3,
    "refund_small": 3,
    "refund_tier_1": 3,
    "refund_tier_2": 2,
    "refund_tier_3": 1,
    "refund_archived": 1,
    "refund_marketplace": 1,
    "refund_long_thread": 1,
    "question": 3,
    "research": 3,
}


@dataclass
class SimulatorPass:
    """What one simulator pass did, for logs and tests."""

    submitted: list[int] = field(default_factory=list)
    settled: list[int] = field(default_factory=list)
    decided: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)


class DemoSimulator:
    """Keeps a steady trickle of demo work: submits runs, settles refunds, clears old approvals.

    It opens with one of each scenario (``OPENING``), then submits a weighted mix (``MIX``) at a
    calmer pace, holding back a workflow whose spend today nears its daily ceiling. Approvals and escalations are left for people to decide: a new operator always
    finds something to approve, retry, skip or abort. Only with ``auto_decide`` (``demo
    --auto-decide``) are those older than ``auto_decide_after`` answered (approvals mostly
    approved, escalations retried), so the queues do not grow while nobody is watching.
    """

    def __init__(
        self,
        *,
        user: User,
        rng: random.Random | None = None,
        submit_every: tuple[float, float] = (3.0, 6.0),
        steady_every: tuple[float, float] = (8.0, 15.0),
        max_active: int = 200,
        max_open_items: int = 20,
        settle_after: timedelta = timedelta(seconds=60),
        auto_decide_after: timedelta = timedelta(minutes=2),
        reject_share: float = 0.2,
        auto_decide: bool = False,
    ) -> None:
        self.auto_decide = auto_decide
        self.user = user
        self.rng = rng or random.Random()
        self.submit_every = submit_every
        self.steady_every = steady_every
        #: Active runs of every kind, deferred ones too (customer messages wait for the
        #: tenant's daytime): a bound on the demo's load.
        self.max_active = max_active
        #: Approvals and escalations waiting for a person: past this, nothing new comes.
        self.max_open_items = max_open_items
        self.settle_after = settle_after
        self.auto_decide_after = auto_decide_after
        self.reject_share = reject_share
        self._next_submit_at: datetime | None = None
        self._opening = list(OPENING)
        #: Run id -> the scenario it was submitted for (this process's submissions).
        self.scenarios: dict[int, str] = {}

    def tick(self, now: datetime | None = None) -> SimulatorPass:
        """One pass: settle due payments, answer stale approvals and escalations, submit if it
        is time."""
        now = now or timezone.now()
        done = SimulatorPass()
        done.settled = self.settle_payments(now)
        if self.auto_decide:
            done.decided = self.decide_stale_approvals(now)
            done.retried = self.retry_stale_escalations(now)
        if self._next_submit_at is None or now >= self._next_submit_at:
            run_id = self.submit_one()
            if run_id is not None:
                done.submitted.append(run_id)
            every = self.submit_every if self._opening else self.steady_every
            self._next_submit_at = now + timedelta(seconds=self.rng.uniform(*every))
        return done

    def submit_one(self) -> int | None:
        """Submit one demo run unless enough are already active or waiting for people: the next
        of the opening, then one of the mix."""
        if Run.objects.filter(status__in=RUN_ACTIVE).count() >= self.max_active:
            return None
        open_items = Wait.objects.filter(
            status=WaitStatus.OPEN, kind__in=(WaitKind.APPROVAL, WaitKind.ESCALATION)
        )
        if open_items.count() >= self.max_open_items:
            return None
        if self._opening:
            name = self._opening.pop(0)
        else:
            held = self.workflows_near_daily_ceiling()
            names = [n for n in sorted(MIX) if SCENARIOS[n].workflow not in held]
            if not names:
                return None
            name = self.rng.choices(names, weights=[MIX[n] for n in names])[0]
        scenario = SCENARIOS[name]
        submitted = run_submit(
            workflow=scenario.workflow,
            input=self._input_for(name, scenario),
            submitted_by=self.user,
            tenant=self.rng.choice(sorted(DEMO_TENANTS)),
        )
        self.scenarios[submitted.run.pk] = name
        log.info("demo run %s (%s): %s", submitted.run.pk, scenario.workflow, scenario.shows)
        return submitted.run.pk

    def workflows_near_daily_ceiling(self) -> set[str]:
        """Workflows whose spend today is past their daily ceiling's warning share: the simulator
        holds their work back, so the traffic approaches the ceiling and does not cross it."""
        # Demo plumbing reads the ledger directly: no user-facing read wants this list.
        today = period_start_for(ScopeKind.WORKFLOW_DAY, timezone.now())
        return set(
            SpendScope.objects.filter(kind=ScopeKind.WORKFLOW_DAY, period_start=today, limit__gt=0)
            .annotate(used=F("spent") + F("reserved"))
            .filter(used__gte=F("soft_ratio") * F("limit"))
            .values_list("key", flat=True)
        )

    def _input_for(self, name: str, scenario: Scenario) -> dict[str, Any]:
        rng = self.rng
        if scenario.workflow == "content_pipeline":
            return {"topic": rng.choice(TOPICS), "audience": rng.choice(AUDIENCES)}
        if scenario.workflow == "research_brief":
            return {"question": rng.choice(QUESTIONS), "max_subquestions": rng.randint(2, 6)}
        customer = {
            "customer_id": f"cus_{rng.randint(1000, 9999)}",
            "channel": rng.choice(("email", "email", "sms")),
        }
        if scenario.order is None:
            return {
                **customer,
                "order_id": f"ord_{rng.randint(10000, 99999)}",
                "message": rng.choice(QUESTION_MESSAGES),
            }
        message = rng.choice(REFUND_MESSAGES)
        if name == "refund_long_thread":
            message = long_thread(message, rng)
        return {**customer, "order_id": order_id_of_kind(scenario.order, rng), "message": message}

    def settle_payments(self, now: datetime) -> list[int]:
        """The payment provider confirms refunds a few seconds after they were issued."""
        # Demo plumbing reads the waits table directly: no user-facing read wants "event waits
        # older than N seconds", so it is not worth a selector.
        due = Wait.objects.filter(
            kind=WaitKind.EVENT,
            name=SETTLEMENT_EVENT,
            status=WaitStatus.OPEN,
            created_at__lte=now - self.settle_after,
        ).values_list("pk", "run_id", "run__state")[:20]
        settled = []
        for wait_id, run_id, state in due:
            payload = {
                "refund_id": (state or {}).get("refund_id"),
                "status": "settled",
                "provider": "demo-pay",
                "settled_at": now.isoformat(),
            }
            try:
                run_send_event(
                    run_id=run_id,
                    name=SETTLEMENT_EVENT,
                    event_id=f"demo-settlement-{wait_id}",
                    payload=payload,
                    user=None,
                )
            except SignalboxError as exc:  # the run ended meanwhile (cancelled by an operator)
                log.info("settlement for run %s not sent: %s", run_id, exc)
                continue
            settled.append(run_id)
        return settled

    def decide_stale_approvals(self, now: datetime) -> list[int]:
        """Decide approvals nobody answered within ``auto_decide_after`` (most are approved)."""
        decided = []
        for wait in approvals_pending_for_user(self.user, limit=50):
            if wait.created_at > now - self.auto_decide_after:
                continue
            reject = self.rng.random() < self.reject_share
            try:
                approval_decide(
                    wait_id=wait.pk,
                    user=None,
                    decision="reject" if reject else "approve",
                    reason=f"decided by the demo simulator after {self.auto_decide_after.total_seconds():.0f}s unanswered",
                )
            except SignalboxError as exc:  # a person decided it first
                log.info("approval %s not auto-decided: %s", wait.pk, exc)
                continue
            decided.append(wait.pk)
        return decided

    def retry_stale_escalations(self, now: datetime) -> list[int]:
        """Retry escalated steps nobody answered within ``auto_decide_after`` (demo agents fail
        transiently now and then; a retry usually goes through). A step already retried once
        is aborted instead: an archived order or a long thread fails the same way every time."""
        retried = []
        stale = Wait.objects.filter(
            kind=WaitKind.ESCALATION,
            status=WaitStatus.OPEN,
            created_at__lte=now - self.auto_decide_after,
        ).order_by("id")[:50]
        for wait in stale:
            again = Wait.objects.filter(
                step_id=wait.step_id, kind=WaitKind.ESCALATION, decision=Decision.RETRY
            ).exists()
            action = "abort" if again else "retry"
            try:
                escalation_resolve(
                    wait_id=wait.pk,
                    user=None,
                    action=action,
                    reason=f"{'aborted' if again else 'retried'} by the demo simulator after "
                    f"{self.auto_decide_after.total_seconds():.0f}s unanswered",
                )
            except SignalboxError as exc:  # a person answered it first
                log.info("escalation %s not auto-answered: %s", wait.pk, exc)
                continue
            retried.append(wait.pk)
        return retried


def long_thread(request: str, rng: random.Random) -> str:
    """A refund request with the customer's whole earlier correspondence pasted below it."""
    lines = [request, "", "---- earlier messages ----"]
    for number in range(LONG_THREAD_MESSAGES):
        who = "Customer Care" if number % 2 else "me"
        body = rng.choice(
            (
                "Thanks for getting back to me, I am still waiting for an update on this order.",
                "We are sorry for the delay; a colleague is looking into the delivery now.",
                "Could you send a photo of the damage and the label on the parcel?",
                "I attached the photos yesterday, please check your inbox again.",
            )
        )
        lines += [
            f"> On day {number // 4 + 1}, {who} wrote (message {number + 1}):",
            f"> {body}",
            "> Kind regards -- sent from my phone, please excuse the brevity and any typos.",
            "> This message and any attachments are confidential and meant for the addressee only.",
        ]
    return "\n".join(lines)
