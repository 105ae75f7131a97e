"""Durable engine state: runs, steps, run-state versions, waits and outside events.

A paused run is rows, not a thread. Hot counters (active steps, node visits, pending joins) live
on the run row, which every advance locks anyway, so computing what is ready costs no extra query.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class RunStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"
    #: Failed or cancelled; the compensations of its completed side effects are running.
    COMPENSATING = "compensating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


RUN_TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)
RUN_ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.WAITING, RunStatus.COMPENSATING)


class StepStatus(models.TextChoices):
    PENDING = "pending"  # a map item held back by the concurrency limit
    QUEUED = "queued"
    RUNNING = "running"
    WAITING = "waiting"  # on an approval or an outside event
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


STEP_ACTIVE = (StepStatus.PENDING, StepStatus.QUEUED, StepStatus.RUNNING, StepStatus.WAITING)
STEP_TERMINAL = (StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.CANCELLED, StepStatus.SKIPPED)


class StepKind(models.TextChoices):
    AGENT = "agent"
    ROUTE = "route"
    MAP = "map"
    ITEM = "item"  # one element of a map's dynamic fan-out
    WAIT = "wait"
    COMPENSATE = "compensate"  # undoes a completed step's side effect (its parent)


#: The workflow escalation drills run under.
DRILL_WORKFLOW = "drill"


class Run(models.Model):
    """One piece of work flowing through a workflow."""

    workflow_name = models.CharField(max_length=100)
    # Counters here and on Step are plain integers, not Positive*Field: PostgreSQL evaluates
    # every CHECK constraint of a table on every write of a row, and these rows are written on
    # every step. The engine is their only writer; its tests hold them at zero or above.
    workflow_version = models.IntegerField()
    status = models.CharField(max_length=12, choices=RunStatus.choices, default=RunStatus.QUEUED)
    priority = models.SmallIntegerField(default=0)
    #: Whom the run is done for: who may see and decide it follows from permissions on the tenant.
    #: Indexed by ``run_tenant_status_idx``, which serves a lookup by tenant alone as well.
    tenant = models.ForeignKey(
        "policies.Tenant", on_delete=models.PROTECT, related_name="+", db_index=False
    )
    submitted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Idempotency keys are unique per submitter (scope is the user id, or "system").
    idempotency_scope = models.CharField(max_length=64, blank=True, default="")
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 (NULL = no key, outside the unique constraint)
    #: Digest of what was asked (workflow, version, input, priority, tenant): the same key with
    #: another request is refused instead of answered with this run.
    request_digest = models.CharField(max_length=64, blank=True, default="")
    trace_id = models.CharField(max_length=32)
    seed = models.BigIntegerField(default=0)

    input = models.JSONField(default=dict)
    output = models.JSONField(null=True, blank=True)
    #: Current value of every state key; the history is in StateVersion.
    state = models.JSONField(default=dict)
    #: Current version number of every state key.
    state_versions = models.JSONField(default=dict)

    #: Engine bookkeeping: visits per node, pending join arrivals, counters.
    node_visits = models.JSONField(default=dict)
    pending_joins = models.JSONField(default=dict)
    active_steps = models.IntegerField(default=0)
    waiting_steps = models.IntegerField(default=0)
    step_count = models.IntegerField(default=0)
    #: Bumped by every write of this row: completions check it instead of locking first.
    version = models.BigIntegerField(default=0)
    #: Human-readable notes the engine adds (a loop bound taken, a degraded result).
    notes = models.JSONField(default=list, blank=True)
    #: Steps whose result is degraded: [{"step": key, "reason": text}]; also in ``output``.
    degraded = models.JSONField(default=list, blank=True)

    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")

    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField()
    deadline_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["idempotency_scope", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="run_idempotency_key_unique",
            )
        ]
        indexes = [
            models.Index(fields=["-created_at", "-id"], name="run_created_idx"),
            models.Index(fields=["status", "-id"], name="run_status_idx"),
            # A tenant-scoped user's runs counted by status: an index-only scan of their tenants.
            models.Index(fields=["tenant", "status"], name="run_tenant_status_idx"),
            models.Index(fields=["workflow_name", "-id"], name="run_workflow_idx"),
            models.Index(
                fields=["deadline_at"],
                condition=Q(status__in=["queued", "running", "waiting"]),
                name="run_active_deadline_idx",
            ),
        ]
        permissions = [("decide_run", "Can decide approvals and send events for runs")]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.workflow_name} {self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in RUN_TERMINAL

    @property
    def is_drill(self) -> bool:
        """A synthetic run fired by an escalation drill (the ``drill`` workflow): show it as DRILL."""
        return self.workflow_name == DRILL_WORKFLOW

    @property
    def drill_tier(self) -> int:
        """The tier a drill's escalation opens at (its input's ``tier``, 1 to 3)."""
        tier = self.input.get("tier", 1) if isinstance(self.input, dict) else 1
        return min(max(int(tier), 1), 3) if isinstance(tier, int) else 1


class Step(models.Model):
    """One activation of a node: (node, visit, item). Its ``attempt`` and ``lease_owner`` are
    the fence a completion must present."""

    # No index of its own on ``run`` or ``parent``: every index is written again whenever a
    # step's status changes (never a HOT update), and ``step_run_idx`` already serves lookups
    # by run; ``step_parent_idx`` holds only the steps that have a parent.
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="steps", db_index=False)
    node = models.CharField(max_length=100)
    visit = models.IntegerField(default=1)
    item = models.IntegerField(default=-1)
    kind = models.CharField(max_length=10, choices=StepKind.choices)
    agent = models.CharField(max_length=100, blank=True, default="")
    pool = models.CharField(max_length=50, blank=True, default="")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    status = models.CharField(max_length=10, choices=StepStatus.choices)

    #: Incremented by every claim; a completion must present the token (and owner) it claimed with.
    attempt = models.IntegerField(default=0)
    #: Failed attempts so far (transient failures that were retried).
    failures = models.IntegerField(default=0)
    max_attempts = models.IntegerField(default=3)
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    available_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)

    input = models.JSONField(null=True, blank=True)
    #: An operator's edited input (edit-then-approve); used instead of the state-built input.
    input_override = models.JSONField(null=True, blank=True)
    #: Digest of the action an operator approved; execution checks it still matches.
    approved_digest = models.CharField(max_length=64, blank=True, default="")
    output = models.JSONField(null=True, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    #: Why this step's output is not the full result ("partial: 2 of 5 sources"), if it is not.
    degraded = models.CharField(max_length=500, blank=True, default="")
    #: The model call its successful attempt took from a budget block: ``{"block": id,
    #: "worst": "0.0024", "cost": "0.0012"}`` (decimal strings; cost null when no usage was
    #: reported). Written with the completion instead of a ledger row of its own
    #: (``orchestration.ledger_calls``).
    block_call = models.JSONField(null=True, blank=True)

    error_class = models.CharField(max_length=12, blank=True, default="")
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    error_detail = models.JSONField(null=True, blank=True)
    #: Every failed attempt: [{attempt, class, code, message, at}].
    attempts_log = models.JSONField(default=list, blank=True)

    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["run", "node", "visit", "item"], name="step_activation_unique"
            )
        ]
        indexes = [
            models.Index(fields=["run", "id"], name="step_run_idx"),
            models.Index(
                fields=["parent"], condition=Q(parent__isnull=False), name="step_parent_idx"
            ),
            models.Index(
                fields=["available_at"], condition=Q(status="queued"), name="step_queued_idx"
            ),
            models.Index(
                fields=["lease_expires_at"], condition=Q(status="running"), name="step_running_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"step {self.pk} {self.key} ({self.status})"

    @property
    def key(self) -> str:
        """Readable identity within the run: ``draft``, ``draft#2``, ``answer[3]``."""
        text = self.node if self.visit == 1 else f"{self.node}#{self.visit}"
        return text if self.item < 0 else f"{text}[{self.item}]"


class StateVersion(models.Model):
    """One write of one run-state key. Never updated: a new write is a new version."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="state_history")
    key = models.CharField(max_length=100)
    version = models.IntegerField()
    value = models.JSONField(null=True)
    step = models.ForeignKey(
        Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: Who wrote it: an agent name, "submit", "event:<name>" or "operator:<username>".
    writer = models.CharField(max_length=150)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["run", "key", "version"], name="state_version_unique")
        ]

    def __str__(self) -> str:
        return f"{self.key} v{self.version}"


class WaitKind(models.TextChoices):
    APPROVAL = "approval"
    EVENT = "event"
    #: A step that exhausted its recovery, waiting for an operator (an escalation).
    ESCALATION = "escalation"


class WaitStatus(models.TextChoices):
    OPEN = "open"
    APPROVED = "approved"
    REJECTED = "rejected"
    RECEIVED = "received"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    STALE = "stale"  # the action changed after approval; a new wait was opened
    RESOLVED = "resolved"  # an escalation an operator retried, skipped or aborted


class Decision(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"
    # on escalations
    RETRY = "retry"
    SKIP = "skip"
    ABORT = "abort"


ESCALATION_ACTIONS = (Decision.RETRY, Decision.SKIP, Decision.ABORT)


class Wait(models.Model):
    """A step paused on a human decision or a named outside event, with a deadline.

    Approvals and escalations are the decisions: an escalation's ``action`` holds its full
    context (every attempt, error, provider and fallback tried) and ``reason`` says why."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="waits")
    #: The run's tenant, copied when the wait opens: who may see a wait follows from its tenant,
    #: so a tenant's open waits are counted and listed without reading its runs. Not indexed:
    #: the pages read open waits through the partial indexes below, and a tenant's waits are
    #: always asked for together with the runs a user submitted (``OR``), which no index serves.
    tenant = models.ForeignKey(
        "policies.Tenant", on_delete=models.PROTECT, related_name="+", db_index=False
    )
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="waits")
    kind = models.CharField(max_length=10, choices=WaitKind.choices)
    name = models.CharField(max_length=100)
    status = models.CharField(max_length=10, choices=WaitStatus.choices, default=WaitStatus.OPEN)
    tier = models.PositiveSmallIntegerField(default=1)
    #: How many distinct people must approve (N of M) at the current stage.
    quorum = models.SmallIntegerField(default=1)
    #: A multi-stage sign-off: the tier of each stage in order (tier 2, then tier 3); ``tier``
    #: is the current stage's.
    stages = models.JSONField(default=list, blank=True)
    stage = models.SmallIntegerField(default=0)
    #: The policy version and rule that required this approval (none for a definition's gate).
    policy_version = models.IntegerField(null=True, blank=True)
    policy_rule = models.CharField(max_length=100, blank=True, default="")
    reason = models.TextField(blank=True, default="")
    #: The exact action awaiting approval: agent, input and the versions of the state it read.
    action = models.JSONField(null=True, blank=True)
    action_digest = models.CharField(max_length=64, blank=True, default="")
    deadline_at = models.DateTimeField()
    on_timeout = models.CharField(max_length=100)

    decision = models.CharField(max_length=10, choices=Decision.choices, blank=True, default="")
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    decided_at = models.DateTimeField(null=True, blank=True)
    decision_reason = models.TextField(blank=True, default="")
    edited_input = models.JSONField(null=True, blank=True)
    payload = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField()
    #: When the item's SLA breaches and it escalates a tier (none: ``created_at`` plus the
    #: default SLA); separate from ``deadline_at``, which is when it expires.
    sla_due_at = models.DateTimeField(null=True, blank=True)
    #: How many times its SLA breached (each breach moved it up a tier, at most to tier 3).
    sla_breaches = models.SmallIntegerField(default=0)

    class Meta:
        permissions = [
            ("decide_tier_1", "Can decide approvals and escalations that need tier 1"),
            ("decide_tier_2", "Can decide approvals and escalations that need tier 2"),
            ("decide_tier_3", "Can decide approvals and escalations that need tier 3"),
        ]
        indexes = [
            # (deadline_at, id): the inbox's order, so its first page is read in order and stops
            # there (with only deadline_at, PostgreSQL sorted every open wait joined to its run).
            models.Index(
                fields=["deadline_at", "id"], condition=Q(status="open"), name="wait_open_due_idx"
            ),
            models.Index(
                fields=["kind", "-id"], condition=Q(status="open"), name="wait_open_kind_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} wait {self.pk} ({self.status})"

    @property
    def is_drill(self) -> bool:
        """A synthetic item fired by an escalation drill: show it as DRILL."""
        return self.run.is_drill


class WaitVote(models.Model):
    """One person's approval of an approval that needs several (a quorum, or several stages).
    Bound to the digest of the exact action approved: a vote for another action does not count."""

    wait = models.ForeignKey(Wait, on_delete=models.CASCADE, related_name="votes")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    stage = models.SmallIntegerField(default=0)
    action_digest = models.CharField(max_length=64)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        # Distinct people: one vote per person per approval, whatever the stage.
        constraints = [models.UniqueConstraint(fields=["wait", "user"], name="wait_vote_once")]

    def __str__(self) -> str:
        return f"vote on wait {self.wait_id} by user {self.user_id}"


class WorkflowRecord(models.Model):
    """A registered workflow's name as a row, so that permissions can be granted on it (who may
    decide its items). Created on first use."""

    name = models.CharField(max_length=100, unique=True)

    class Meta:
        permissions = [
            ("decide_workflow", "Can decide approvals and escalations of this workflow's runs")
        ]

    def __str__(self) -> str:
        return self.name


class RunEvent(models.Model):
    """An outside event sent to a run. ``event_id`` makes sending it twice a no-op."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="events")
    name = models.CharField(max_length=100)
    event_id = models.CharField(max_length=200)
    payload = models.JSONField(default=dict)
    wait = models.ForeignKey(
        Wait, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    received_at = models.DateTimeField()
    applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["run", "event_id"], name="run_event_once")]

    def __str__(self) -> str:
        return f"event {self.name} ({self.event_id})"


class ToolCallStatus(models.TextChoices):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # no request went out: the circuit was open or no rate-limit token came


class ToolCall(models.Model):
    """One attempt to call a provider for a capability. Secrets are redacted before it is built."""

    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.CASCADE, related_name="tool_calls"
    )
    step = models.ForeignKey(
        Step, null=True, blank=True, on_delete=models.CASCADE, related_name="tool_calls"
    )
    trace_id = models.CharField(max_length=32, blank=True, default="")
    #: The step key that made the call (``draft#2``, ``answer[3]``) and its call number there.
    node = models.CharField(max_length=200, blank=True, default="")
    # Plain integers, as on Run and Step: no CHECK constraint to evaluate on each insert.
    call_index = models.IntegerField(default=0)
    capability = models.CharField(max_length=100)
    provider = models.CharField(max_length=100)
    #: Attempt number on this provider (1-based).
    attempt = models.SmallIntegerField()
    status = models.CharField(max_length=10, choices=ToolCallStatus.choices)
    params = models.JSONField(default=dict, blank=True)
    #: The result as JSON text, redacted and truncated.
    result_summary = models.TextField(blank=True, default="")
    latency_ms = models.IntegerField(default=0)
    #: The backoff waited after this attempt before the next one, when there was one.
    retry_delay_ms = models.IntegerField(null=True, blank=True)
    error_class = models.CharField(max_length=12, blank=True, default="")
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    tokens = models.IntegerField(null=True, blank=True)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    idempotency_key = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["run", "id"], name="toolcall_run_idx"),
            models.Index(fields=["provider", "-created_at"], name="toolcall_provider_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.capability} via {self.provider} #{self.attempt} ({self.status})"


class WaitClaim(models.Model):
    """An operator's claim on an open approval or escalation: others see who is on it and
    until when. A claim lapses at ``expires_at``; it never stops anyone deciding."""

    wait = models.OneToOneField(
        Wait, on_delete=models.CASCADE, primary_key=True, related_name="claim"
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    claimed_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"claim on wait {self.wait_id} until {self.expires_at:%H:%M:%S}"
