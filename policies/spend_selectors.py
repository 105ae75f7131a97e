"""Reads of the spend ledger, with authorization: what each scope may spend, has spent and
holds, and the reservations of a run.

Who sees what: a user with ``orchestration.view_run`` (every run) sees every scope; anyone else
sees the monthly scopes of the tenants they may see runs of (``policies.view_runs`` on the
tenant), and nothing per run, workflow, agent or globally (those mix tenants).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth.models import User
from django.db.models import QuerySet
from guardian.shortcuts import get_objects_for_user

from audit.services import Entry, audit_record_alone
from audit.verbs import ActorType, Verb
from policies.errors import Code, PolicyDenied, SpendNotVisible
from policies.limits import CEILING_RAISE_TIER, MONEY_QUANTUM
from policies.models import Reservation, ScopeKind, SpendScope, Tenant

VIEW_ALL = "orchestration.view_run"
VIEW_FOR_TENANT = "policies.view_runs"
#: The tier that may raise a ceiling.
RAISE_TIER_PERM = f"orchestration.decide_tier_{CEILING_RAISE_TIER}"


@dataclass(frozen=True, slots=True)
class ScopeUse:
    scope: SpendScope

    @property
    def committed(self) -> Decimal:
        return Decimal(self.scope.spent) + Decimal(self.scope.reserved)

    def percent(self, amount: Decimal) -> float:
        limit = Decimal(self.scope.limit)
        return float((Decimal(amount) * 100 / limit).quantize(Decimal("0.01"))) if limit else 100.0

    def as_dict(self) -> dict[str, object]:
        s = self.scope
        return {
            "id": s.pk,
            "kind": s.kind,
            "key": s.key,
            "period_start": s.period_start.isoformat() if s.period_start else None,
            "limit": str(Decimal(s.limit).quantize(MONEY_QUANTUM)),
            "spent": str(Decimal(s.spent).quantize(MONEY_QUANTUM)),
            "reserved": str(Decimal(s.reserved).quantize(MONEY_QUANTUM)),
            "spent_percent": self.percent(Decimal(s.spent)),
            "committed_percent": self.percent(self.committed),
            "soft_percent": float(Decimal(s.soft_ratio) * 100),
        }


def spend_scopes_for_user(user: User) -> QuerySet[SpendScope]:
    """The scopes ``user`` may see, newest period first."""
    scopes = SpendScope.objects.order_by("kind", "key", "-period_start")
    if not user.is_active:
        return scopes.none()
    if user.has_perm(VIEW_ALL):
        return scopes
    tenants = get_objects_for_user(user, VIEW_FOR_TENANT, klass=Tenant, accept_global_perms=True)
    return scopes.filter(kind=ScopeKind.TENANT_MONTH, key__in=tenants.values("slug"))


def reservations_for_run_for_user(user: User, run_id: int) -> QuerySet[Reservation]:
    """The reservations of run ``run_id``, oldest first; ``SpendNotVisible`` unless ``user``
    sees every run (a run's calls count against scopes of several kinds)."""
    if not (user.is_active and user.has_perm(VIEW_ALL)):
        raise SpendNotVisible(f"you may not see the spend of run {run_id}")
    return Reservation.objects.filter(run_id=run_id).order_by("id")


def may_raise_ceiling(user: User) -> bool:
    """Whether ``user`` holds the tier that raises a cost ceiling (2 or higher)."""
    return user.is_active and user.has_perm(RAISE_TIER_PERM)


def ceiling_raise_check(
    user: User, *, scope_id: int | None, run_id: int | None, new_limit: Decimal
) -> None:
    """``PolicyDenied`` (``ceiling_tier_required``) unless ``user`` holds tier 2 or higher; the
    refusal is recorded (``ceiling.raised`` with what was refused) before it is raised."""
    if may_raise_ceiling(user):
        return
    audit_record_alone(
        Entry(
            verb=Verb.CEILING_RAISED,
            object_type="spend_scope",
            object_id=scope_id or f"run:{run_id}",
            actor_type=ActorType.HUMAN,
            actor_id=user.get_username(),
            run_id=run_id,
            data={"refused": "tier 2 required", "new_limit": str(new_limit)},
        )
    )
    raise PolicyDenied(
        "raising a cost ceiling needs tier 2 or higher", code=Code.CEILING_TIER_REQUIRED
    )
