"""The console's pages with 100,000 runs (issue 19): home, inbox and run list, server time.

A few hundred runs are made by the real engine (most succeeded, some paused at an approval,
some escalated), then cloned in SQL, with their steps and waits, to ``--page-runs`` runs whose
creation times are spread over the last 30 days. Each page is then requested over HTTP from
the web server as deployed, by a logged-in console user (session cookie), ``--page-requests``
times after two warm-up requests; the time measured is the client's, from sending the request
to the last byte of the answer (server time plus a loopback hop), so an upper bound of the
server's. Two users: one who may see every run, and one who sees a tenant through an object
permission (django-guardian), whose pages narrow runs and waits by the tenant ids ``run_scope``
reads (a wait carries its run's tenant; the clones copy it with the other columns).
"""

from __future__ import annotations

import time
from typing import Any

from tests.bench.run import Row, wait_all


def _columns(cursor: Any, table: str) -> list[str]:
    cursor.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
        [table],
    )
    return [row[0] for row in cursor.fetchall()]


def _clone(cursor: Any, table: str, templates: str, copies: int, shifted: dict[str, str]) -> None:
    """INSERT ``copies`` copies of ``table``'s rows matching ``templates`` (a WHERE clause on t),
    with the expressions in ``shifted`` for some columns (``g`` is the copy's number)."""
    columns = _columns(cursor, table)
    values = ", ".join(shifted.get(c, f"t.{c}") for c in columns)
    cursor.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT {values} "
        f"FROM {table} t CROSS JOIN generate_series(1, %s) g WHERE {templates}",
        [copies],
    )


def load_runs(total: int) -> dict[str, int]:
    """Bring the database to ``total`` runs: templates by the engine, then SQL clones."""
    from django.db import connection

    from orchestration.models import Run
    from orchestration.services import drill_fire, run_submit

    templates = max(total // 1000, 50)
    waiting = max(templates * 3 // 100, 1)
    escalated = max(templates // 100, 1)
    done = templates - waiting - escalated
    ids = [run_submit(workflow="reference_workload", input={}).run.pk for _ in range(done)]
    wait_all(ids, "succeeded")
    paused = [
        run_submit(workflow="reference_workload", input={"needs_approval": True}).run.pk
        for _ in range(waiting)
    ]
    wait_all(paused, "waiting")
    drills = [drill_fire(user=None, tier=1).pk for _ in range(escalated)]
    wait_all(drills, "waiting")
    existing = Run.objects.count()
    copies = max((total - existing) // templates, 0)
    runs = ids + paused + drills
    where = f"t.run_id BETWEEN {min(runs)} AND {max(runs)}"
    spread = "t.{0} - g * interval '{1} seconds'".format
    step = 30 * 86400 // max(copies, 1)
    with connection.cursor() as cursor:
        # Each table's copies get ids past any id a process may have reserved (blocks of 200).
        shift: dict[str, str] = {}
        for table, scope in (
            ("orchestration_run", f"id BETWEEN {min(runs)} AND {max(runs)}"),
            ("orchestration_step", f"run_id BETWEEN {min(runs)} AND {max(runs)}"),
            ("orchestration_wait", f"run_id BETWEEN {min(runs)} AND {max(runs)}"),
        ):
            cursor.execute(
                f"SELECT min(id), max(id), (SELECT max(id) FROM {table}) FROM {table} WHERE {scope}"
            )
            low, high, top = cursor.fetchone()
            base, span = top + 10_000, high - low + 1
            shift[table] = f"{base} + (g - 1) * {span} - {low} + t.{{0}}"
        new_id = {table: expr.format for table, expr in shift.items()}
        _clone(
            cursor,
            "orchestration_run",
            f"t.id BETWEEN {min(runs)} AND {max(runs)}",
            copies,
            {
                "id": new_id["orchestration_run"]("id"),
                "idempotency_key": "NULL",
                "created_at": spread("created_at", step),
                "started_at": spread("started_at", step),
                "finished_at": spread("finished_at", step),
                "updated_at": spread("updated_at", step),
            },
        )
        _clone(
            cursor,
            "orchestration_step",
            where,
            copies,
            {
                "id": new_id["orchestration_step"]("id"),
                "run_id": new_id["orchestration_run"]("run_id"),
                "parent_id": new_id["orchestration_step"]("parent_id"),
            },
        )
        _clone(
            cursor,
            "orchestration_wait",
            where,
            copies,
            {
                "id": new_id["orchestration_wait"]("id"),
                "run_id": new_id["orchestration_run"]("run_id"),
                "step_id": new_id["orchestration_step"]("step_id"),
            },
        )
        for table in ("orchestration_run", "orchestration_step", "orchestration_wait"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )
            # As autovacuum leaves a table at rest: statistics, and the visibility map that lets
            # a count read an index alone.
            cursor.execute(f"VACUUM ANALYZE {table}")
        cursor.execute("SELECT status, count(*) FROM orchestration_run GROUP BY status")
        counts = dict(cursor.fetchall())
        cursor.execute(
            "SELECT kind, count(*) FROM orchestration_wait WHERE status = 'open' GROUP BY kind"
        )
        counts.update({f"open {kind}": n for kind, n in cursor.fetchall()})
    return counts


def page_users() -> list[tuple[str, str]]:
    """(label, session cookie): a user who sees every run, one who sees a tenant by object grant."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission
    from django.test import Client
    from guardian.shortcuts import assign_perm

    from policies.models import Tenant

    everything = Permission.objects.filter(
        content_type__app_label__in=["orchestration", "policies"]
    )
    tenant_scoped = everything.exclude(codename__in=["view_run", "view_runs"])
    users = []
    for label, perms in (("sees every run", everything), ("sees one tenant", tenant_scoped)):
        user, _ = get_user_model().objects.get_or_create(username=f"pages-{len(users)}")
        user.user_permissions.set(perms)
        if label == "sees one tenant":
            for tenant in Tenant.objects.all():
                assign_perm("policies.view_runs", user, tenant)
        client = Client()
        client.force_login(user)
        users.append((label, client.cookies["sessionid"].value))
    return users


def bench_pages(port: int, total: int, requests: int) -> tuple[list[Row], str]:
    import httpx

    counts = load_runs(total)
    rows = []
    for label, cookie in page_users():
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", cookies={"sessionid": cookie}
        ) as http:
            for name, path in (("home", "/"), ("inbox", "/inbox/"), ("run list", "/runs/")):
                row = Row(
                    f"{name} ({label}), {sum(v for k, v in counts.items() if not k.startswith('open'))} runs",
                    requests,
                )
                for index in range(requests + 2):
                    t0 = time.perf_counter()
                    response = http.get(path)
                    elapsed = (time.perf_counter() - t0) * 1000
                    assert response.status_code == 200, (path, response.status_code)
                    if index >= 2:
                        row.latencies_ms.append(elapsed)
                        row.seconds += elapsed / 1000
                rows.append(row)
    return rows, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
