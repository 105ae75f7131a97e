"""The standard roles, as Django groups with their permissions, and what a tenant grant is.

Tiers are cumulative: ``Operator tier 2`` may decide what needs tier 1 or 2. What operators may
see and decide is narrowed per tenant (object permissions on the tenant, django-guardian) and,
where wanted, per workflow; the groups carry only what is the same for everyone in them.
Auditors read everything and change nothing; policy admins draft, review and activate policies
(four eyes: not their own drafts).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import Group, Permission
from guardian.shortcuts import assign_perm

from policies.models import Tenant

OPERATOR = ["orchestration.decide_run", "orchestration.decide_workflow", "orchestration.add_run"]

#: What a policy admin (staff) does in Django's admin: users and their groups (roles, tiers),
#: tenants and workflows with their object grants. Superuser status stays out of their reach
#: (console.admin makes it read-only for them).
ADMIN_SITE = [
    "auth.view_user",
    "auth.add_user",
    "auth.change_user",
    "auth.view_group",
    "auth.change_group",
    "policies.change_tenant",
    "orchestration.view_workflowrecord",
    "orchestration.change_workflowrecord",
]

#: Group name -> "app_label.codename" permissions.
ROLES: dict[str, list[str]] = {
    "Operator tier 1": [*OPERATOR, "orchestration.decide_tier_1"],
    "Operator tier 2": [*OPERATOR, "orchestration.decide_tier_1", "orchestration.decide_tier_2"],
    "Operator tier 3": [
        *OPERATOR,
        "orchestration.decide_tier_1",
        "orchestration.decide_tier_2",
        "orchestration.decide_tier_3",
    ],
    "Policy admin": [
        "policies.edit_policy",
        "policies.review_policy",
        "policies.view_policy",
        "policies.view_policyversion",
        "policies.view_tenant",
        "orchestration.view_run",
        "policies.view_runs",
        *ADMIN_SITE,
    ],
    "Auditor": [
        "orchestration.view_run",
        "policies.view_runs",
        "policies.view_policy",
        "policies.view_policyversion",
    ],
}

#: What working for a tenant grants on it: seeing its runs, submitting and deciding for it.
TENANT_OPERATOR = ["policies.view_runs", "policies.submit_runs", "policies.decide_runs"]
#: What a service account that only submits work gets on a tenant.
TENANT_SUBMITTER = ["policies.submit_runs"]


def roles_sync() -> dict[str, Group]:
    """Create the standard groups (if missing) and give each exactly its permissions."""
    groups = {}
    for name, perms in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(_permissions(perms))
        groups[name] = group
    return groups


def tenant_grant(
    user_or_group: object, tenant: Tenant, perms: Iterable[str] = TENANT_OPERATOR
) -> None:
    """Give a user or group ``perms`` on ``tenant`` (object permissions)."""
    for perm in perms:
        assign_perm(perm, user_or_group, tenant)


def _permissions(names: Iterable[str]) -> list[Permission]:
    found = []
    for name in names:
        app_label, _, codename = name.partition(".")
        found.append(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return found
