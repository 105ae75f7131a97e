"""Tenants, policy documents and their versions, the decisions made with them, and the spend
ledger that holds cost ceilings.

A policy is a structured document (``policies.document``), versioned: a draft is submitted,
approved by a second admin, then activated; every decision the engine makes records the version
that made it. The ledger keeps, per scope (a run, a workflow per day, an agent per day, a tenant
per month, everything per day), what is spent and what is reserved, so that a hard ceiling is
never exceeded, even with many workers reserving at once.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q


class Tenant(models.Model):
    """Whom a run is done for. Who may submit for, see, or decide for a tenant is a permission on
    it (django-guardian), so an operator sees only the runs of tenants they may see."""

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    #: Where the tenant is: time windows in its policy ("customer messages 08:00-20:00") are in
    #: this zone (an IANA name).
    time_zone = models.CharField(max_length=64, default="UTC")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        permissions = [
            ("submit_runs", "Can submit runs for this tenant"),
            ("view_runs", "Can see this tenant's runs"),
            ("decide_runs", "Can decide approvals and escalations of this tenant's runs"),
        ]

    def __str__(self) -> str:
        return self.slug


class PolicyStatus(models.TextChoices):
    DRAFT = "draft"
    SUBMITTED = "submitted"
    APPROVED = "approved"
    ACTIVE = "active"
    #: Was active; another version replaced it (it can be activated again: a rollback).
    RETIRED = "retired"
    REJECTED = "rejected"


class Policy(models.Model):
    """A named policy and the version of it in force."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True, default="")
    active_version = models.ForeignKey(
        "PolicyVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        permissions = [
            ("edit_policy", "Can draft and submit policy versions"),
            ("review_policy", "Can approve, reject and activate policy versions"),
        ]

    def __str__(self) -> str:
        return self.name


class PolicyVersion(models.Model):
    """One version of a policy's document. Never edited once submitted: a change is a new
    version. Four eyes: the admin who authored a version cannot approve or activate it."""

    policy = models.ForeignKey(Policy, on_delete=models.CASCADE, related_name="versions")
    number = models.IntegerField()
    status = models.CharField(
        max_length=10, choices=PolicyStatus.choices, default=PolicyStatus.DRAFT
    )
    #: The document as its author wrote it (YAML or JSON), for the editor and the diff.
    source = models.TextField()
    #: The validated document (``policies.document.PolicyDocument``), as JSON.
    document = models.JSONField()
    digest = models.CharField(max_length=64)
    #: Why this version exists ("refunds above 1,000 need tier 2").
    note = models.TextField(blank=True, default="")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField()
    submitted_at = models.DateTimeField(null=True, blank=True)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_note = models.TextField(blank=True, default="")
    activated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["policy", "number"], name="policy_version_unique")
        ]
        ordering = ["policy", "-number"]

    def __str__(self) -> str:
        return f"{self.policy.name} v{self.number} ({self.status})"

    def authored_by(self, user: Any) -> bool:
        """Whether ``user`` wrote this version (four eyes: they neither review nor activate
        it). The system (None) authors nobody's."""
        return user is not None and self.author_id is not None and self.author_id == user.pk


class Outcome(models.TextChoices):
    ALLOW = "allow"
    DENY = "deny"
    APPROVE = "approve"  # require approval
    DEFER = "defer"


class PolicyDecision(models.Model):
    """One decision the engine made about an action: the facts it used, the version and rule
    that decided, and why, in words. What simulation replays a draft against."""

    run_id = models.BigIntegerField(null=True, blank=True)
    step_id = models.BigIntegerField(null=True, blank=True)
    #: ``agent:<name>`` or ``tool:<capability>``.
    action = models.CharField(max_length=200)
    workflow = models.CharField(max_length=100, blank=True, default="")
    tenant = models.CharField(max_length=100, blank=True, default="")
    facts = models.JSONField()
    #: No constraint in the database: every decision row would check it, taking a share lock
    #: on the one active version's row that every worker's transaction then contends for (a
    #: version is never deleted: ``PROTECT`` still refuses it in Django).
    #: Nor an index: no query looks decisions up by version (a run's are found by run, the
    #: replayed history by time), and it was one more index entry written per decision.
    version = models.ForeignKey(
        PolicyVersion,
        null=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,
        db_index=False,
    )
    rule = models.CharField(max_length=100, blank=True, default="")
    outcome = models.CharField(max_length=8, choices=Outcome.choices)
    tier = models.SmallIntegerField(default=0)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["created_at"], name="decision_created_idx"),
            models.Index(fields=["run_id", "id"], name="decision_run_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.action}: {self.outcome} ({self.rule or 'default'})"


class ScopeKind(models.TextChoices):
    RUN = "run"
    WORKFLOW_DAY = "workflow_day"
    AGENT_DAY = "agent_day"
    TENANT_MONTH = "tenant_month"
    GLOBAL_DAY = "global_day"


class SpendScope(models.Model):
    """What one scope may spend in one period, and what it has spent and reserved. A
    reservation succeeds only if ``spent + reserved + amount <= limit`` holds in the same
    UPDATE that adds it (no read-then-write)."""

    kind = models.CharField(max_length=16, choices=ScopeKind.choices)
    #: The run id, workflow name, agent name or tenant slug; empty for the global scope.
    key = models.CharField(max_length=200, blank=True, default="")
    #: The period's start (a day or a month, in UTC); None for a run.
    period_start = models.DateTimeField(null=True, blank=True)
    limit = models.DecimalField(max_digits=14, decimal_places=6)
    #: Spend above this share of the limit warns (0.8: at 80 %).
    soft_ratio = models.DecimalField(max_digits=4, decimal_places=3, default=0.8)
    reserved = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    spent = models.DecimalField(max_digits=14, decimal_places=6, default=0)
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "key", "period_start"],
                name="spend_scope_unique",
                condition=Q(period_start__isnull=False),
            ),
            models.UniqueConstraint(
                fields=["kind", "key"],
                name="spend_scope_run_unique",
                condition=Q(period_start__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind}:{self.key or '*'} {self.spent}+{self.reserved}/{self.limit}"


class ReservationStatus(models.TextChoices):
    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"


class ReservationKind(models.TextChoices):
    #: One call's worst case, set aside in every scope the call counts against.
    CALL = "call"
    #: Several calls' worst cases set aside at once (a run's budget block), spent call by call
    #: in the memory of the worker that holds it; settled with what those calls cost.
    BLOCK = "block"


class Reservation(models.Model):
    """Money set aside for one call before it is made, in every scope it counts against;
    settled with the actual cost after, or released (by the reaper, if its worker died). A
    block sets aside several calls' worth at once; each call made from it moves no scope: the
    block's settlement charges them all (``policies.blocks``). Such a call is recorded on its
    step's row by the completion that writes it (``policies.calls``), or, when that completion
    was not written, as a row here (``block_id``), recorded settled."""

    run_id = models.BigIntegerField(null=True, blank=True)
    step_id = models.BigIntegerField(null=True, blank=True)
    #: What it is for: ``agent:<name>`` or ``tool:<capability>``, and the model priced.
    action = models.CharField(max_length=200)
    amount = models.DecimalField(max_digits=14, decimal_places=6)
    actual = models.DecimalField(max_digits=14, decimal_places=6, null=True, blank=True)
    #: The SpendScope rows it counts against (all of them, or the reservation is refused).
    scope_ids = models.JSONField(default=list)
    status = models.CharField(
        max_length=8, choices=ReservationStatus.choices, default=ReservationStatus.HELD
    )
    #: The worker holding it, and until when (its step's lease): past that, the reaper releases it.
    owner = models.CharField(max_length=200, blank=True, default="")
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField()
    settled_at = models.DateTimeField(null=True, blank=True)
    kind = models.CharField(
        max_length=5,
        choices=ReservationKind.choices,
        default=ReservationKind.CALL,
        db_default=ReservationKind.CALL,
    )
    #: The block this call was made from (its scope_ids are empty: the block counts it).
    block_id = models.BigIntegerField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["expires_at"], condition=Q(status="held"), name="reservation_held_idx"
            ),
            models.Index(fields=["run_id"], name="reservation_run_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.amount} ({self.status})"
