"""``run_scope`` against ``runs_visible_to``: for every kind of user, the runs, waits and steps
a scope selects are exactly those of the runs the reference definition lets them see, and home
and the inbox count and list those; a tenant-scoped user's home and inbox in a fixed number of
queries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser, Group
from django.test import Client
from guardian.shortcuts import assign_perm

from orchestration.models import Run, Step, StepStatus, Wait, WaitStatus
from orchestration.selectors import (
    home_counts_for_user,
    inbox_count_for_user,
    inbox_for_user,
    run_scope,
    runs_visible_to,
    wait_sla_due,
)
from orchestration.services import run_submit
from policies.models import Tenant
from tests.factories import TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

SUBMITS = ["orchestration.add_run", "policies.submit_runs"]


@pytest.fixture
def world(requester: Any, drive: Callable[[int], Run]) -> dict[str, Any]:
    """Three tenants, each with a run waiting for an approval, an escalated run and a queued
    one; ``sam`` submitted a run in each of two tenants, ``pat`` one in the third."""
    sam = UserFactory(username="sam", permissions=SUBMITS)
    pat = UserFactory(username="pat", permissions=SUBMITS)
    runs: dict[str, Run] = {}
    for slug in ("acme", "globex", "initech"):
        TenantFactory(slug=slug)
        runs[f"{slug}-approval"] = drive(
            run_submit(
                workflow="reference_workload",
                input={"needs_approval": True},
                tenant=slug,
                submitted_by=requester,
            ).run.pk
        )
        runs[f"{slug}-escalation"] = drive(
            run_submit(
                workflow="escalating", input={"fail_attempts": 2}, tenant=slug, submitted_by=None
            ).run.pk
        )
        runs[f"{slug}-queued"] = run_submit(
            workflow="reference_workload", input={}, tenant=slug, submitted_by=None
        ).run
    for slug in ("acme", "initech"):
        runs[f"{slug}-sam"] = run_submit(
            workflow="reference_workload", input={}, tenant=slug, submitted_by=sam
        ).run
    runs["initech-pat"] = run_submit(
        workflow="reference_workload", input={}, tenant="initech", submitted_by=pat
    ).run
    assert Wait.objects.filter(status=WaitStatus.OPEN).values("kind").distinct().count() == 2
    return {
        "runs": runs,
        "sam": sam,
        "pat": pat,
        "tenant": {t.slug: t for t in Tenant.objects.all()},
    }


def _users(world: dict[str, Any]) -> dict[str, Any]:
    """Every way of seeing runs, alone and combined, and ways of seeing none."""
    tenant, runs = world["tenant"], world["runs"]

    def user(name: str, *perms: str, **fields: Any) -> Any:
        made = UserFactory(username=name, permissions=list(perms))
        for field, value in fields.items():
            setattr(made, field, value)
        made.save()
        return made

    users: dict[str, Any] = {
        "superuser": user("root", is_superuser=True),
        "inactive superuser": user("old-root", is_superuser=True, is_active=False),
        "global view_run": user("viewer", "orchestration.view_run"),
        "global view_runs": user("tenants-viewer", "policies.view_runs"),
        "one tenant": user("acme-operator", "orchestration.decide_run"),
        "two tenants": user("two-tenants"),
        "one run": user("one-run"),
        "submitter only": world["sam"],
        "tenant, run and own runs": world["pat"],
        "inactive, one tenant": user("gone", is_active=False),
        "no permission": user("stranger"),
        "tenant through a group": user("grouped"),
        "run through a group": user("grouped-run"),
        "global view_run through a group": user("grouped-viewer"),
        "other object permissions": user("decider"),
        "anonymous": AnonymousUser(),
    }
    assign_perm("policies.view_runs", users["one tenant"], tenant["acme"])
    for slug in ("acme", "globex"):
        assign_perm("policies.view_runs", users["two tenants"], tenant[slug])
    assign_perm("orchestration.view_run", users["one run"], runs["globex-approval"])
    assign_perm("policies.view_runs", users["tenant, run and own runs"], tenant["globex"])
    assign_perm("orchestration.view_run", users["tenant, run and own runs"], runs["acme-queued"])
    assign_perm("policies.view_runs", users["inactive, one tenant"], tenant["initech"])
    group = Group.objects.create(name="globex-watchers")
    assign_perm("policies.view_runs", group, tenant["globex"])
    users["tenant through a group"].groups.add(group)
    run_group = Group.objects.create(name="one-run-watchers")
    assign_perm("orchestration.view_run", run_group, runs["initech-escalation"])
    users["run through a group"].groups.add(run_group)
    viewers = Group.objects.create(name="viewers")
    viewers.permissions.add(*_permissions("orchestration.view_run"))
    users["global view_run through a group"].groups.add(viewers)
    assign_perm("policies.decide_runs", users["other object permissions"], tenant["acme"])
    assign_perm("orchestration.decide_run", users["other object permissions"], runs["acme-queued"])
    return users


def _permissions(*names: str) -> list[Any]:
    from django.contrib.auth.models import Permission

    return [
        Permission.objects.get(content_type__app_label=app, codename=codename)
        for app, _, codename in (name.partition(".") for name in names)
    ]


def _ids(rows: Any) -> set[int]:
    return set(rows.values_list("pk", flat=True))


def test_a_scope_selects_exactly_the_runs_waits_and_steps_the_reference_lets_a_user_see(
    world: dict[str, Any],
) -> None:
    seen = set()
    for kind, user in _users(world).items():
        scope = run_scope(user)
        visible = _ids(runs_visible_to(user))
        seen.add(frozenset(visible))
        assert _ids(Run.objects.filter(scope.runs())) == visible, kind
        parts = [_ids(Run.objects.filter(part)) for part in scope.runs_apart()]
        assert set().union(*parts) == visible, kind
        assert sum(map(len, parts)) == len(visible), f"{kind}: a run in two parts"
        waits = Wait.objects.filter(run_id__in=visible)
        assert _ids(Wait.objects.filter(scope.waits())) == _ids(waits), kind
        steps = Step.objects.filter(run_id__in=visible)
        assert _ids(Step.objects.filter(scope.steps())) == _ids(steps), kind
    assert len(seen) >= 10  # the kinds of users see different runs, not all or nothing


def test_home_and_the_inbox_count_and_list_what_the_reference_lets_a_user_see(
    world: dict[str, Any],
) -> None:
    for kind, user in _users(world).items():
        visible = runs_visible_to(user)
        counts = home_counts_for_user(user)
        assert counts.by_status == dict(Counter(visible.values_list("status", flat=True))), kind
        open_waits = Wait.objects.filter(run__in=visible, status=WaitStatus.OPEN)
        assert (counts.waiting_decision, counts.escalated) == (
            open_waits.filter(kind="approval").count(),
            open_waits.filter(kind="escalation").count(),
        ), kind
        active = Step.objects.filter(
            run__in=visible, status__in=[StepStatus.QUEUED, StepStatus.RUNNING]
        )
        assert sum(p["queued"] + p["running"] for p in counts.pools) == active.count(), kind
        expected = [
            w.pk
            for w in sorted(
                open_waits.filter(kind__in=("approval", "escalation")),
                key=lambda w: (wait_sla_due(w), w.pk),
            )
        ]
        assert [item.wait.pk for item in inbox_for_user(user)] == expected, kind
        assert inbox_count_for_user(user) == len(expected), kind


def test_a_users_scope_is_one_query_once_their_permissions_are_loaded(
    world: dict[str, Any], django_assert_num_queries: Any
) -> None:
    users = _users(world)
    for kind, queries in (("tenant, run and own runs", 1), ("global view_run", 0)):
        user = users[kind]
        user.has_perm("orchestration.view_run")  # loads the model permissions, as a page has
        with django_assert_num_queries(queries):
            run_scope(user)


def test_a_wait_carries_its_runs_tenant(world: dict[str, Any]) -> None:
    waits = Wait.objects.select_related("run")
    assert waits.count() >= 6
    assert all(wait.tenant_id == wait.run.tenant_id for wait in waits)


def _tenant_operator() -> Any:
    """Sees the acme tenant through an object permission and decides for every tenant."""
    operator = UserFactory(
        username="acme-lead",
        permissions=[
            "orchestration.decide_run",
            "orchestration.decide_workflow",
            "orchestration.decide_tier_1",
            "policies.decide_runs",
        ],
    )
    assign_perm("policies.view_runs", operator, Tenant.objects.get(slug="acme"))
    return operator


def _logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_a_tenant_scoped_users_home_query_count_does_not_grow_with_runs(
    world: dict[str, Any], drive: Callable[[int], Run], django_assert_num_queries: Any
) -> None:
    client = _logged_in(_tenant_operator())
    # session, user, permissions, their object permissions (the scope), last event, counts by
    # status (the tenants' runs and the others', in one query), waits, pools, ceiling, the
    # page's rows, the tenant filter's choices
    with django_assert_num_queries(11):
        assert client.get("/").status_code == 200
    for _ in range(3):
        drive(run_submit(workflow="escalating", input={"fail_attempts": 2}, tenant="acme").run.pk)
    with django_assert_num_queries(11):
        html = client.get("/").content.decode()
    assert '<span class="num" data-count="escalated">4</span> escalated' in html


def test_a_tenant_scoped_users_inbox_query_count_does_not_grow_with_items(
    world: dict[str, Any], drive: Callable[[int], Run], django_assert_num_queries: Any
) -> None:
    client = _logged_in(_tenant_operator())
    # session, user, permissions, their object permissions (the scope), the open waits (with
    # run, step and claim), the tier roles, the catch-up mark
    with django_assert_num_queries(7):
        assert client.get("/inbox/").status_code == 200
    for _ in range(3):
        drive(run_submit(workflow="escalating", input={"fail_attempts": 2}, tenant="acme").run.pk)
    with django_assert_num_queries(7):
        html = client.get("/inbox/").content.decode()
    assert html.count('id="item-') == 5  # acme's approval and four escalations
