"""Cost ledger throughput: reservations per second (reserve, then settle, as an agent step does),
with 1 and 4 concurrent client processes, against PostgreSQL.

    python -m tests.bench.ledger                      # 2,000 reservations per client
    python -m tests.bench.ledger --per-client 500

Each reservation counts against four scopes (run, workflow per day, tenant per month, global
per day: the demo policy's) and all clients share the workflow, tenant and global rows, so the
rows contended in production are contended here. A database of its own (``BENCH_LEDGER_DATABASE``,
created and migrated if missing) on ``BENCH_PG``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB = os.environ.get("BENCH_LEDGER_DATABASE", "signalbox_bench_ledger")

os.environ.update(
    DJANGO_SETTINGS_MODULE="console.settings",
    SIGNALBOX_ENV=os.environ.get("SIGNALBOX_ENV", "development"),
    DEBUG="false",
    DATABASE_URL=f"{PG}/{DB}",
    LOG_LEVEL="WARNING",
)
os.environ.setdefault("SECRET_KEY", "signalbox-bench-key-not-a-secret-0123456789abcdefghijklmnop")
sys.path.insert(0, str(ROOT))


def _database() -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB]).fetchone():
            conn.execute(f'CREATE DATABASE "{DB}"')


def _client(
    index: int, count: int, start: multiprocessing.synchronize.Event, out: multiprocessing.Queue
) -> None:
    from datetime import timedelta
    from decimal import Decimal

    from django.db import connections

    from policies.ledger import ceiling_reserve, ceiling_settle
    from policies.limits import CeilingScope

    connections.close_all()
    big = Decimal("99999999")
    scopes = [
        CeilingScope("run", f"bench-{os.getpid()}", big, Decimal("0.8")),
        CeilingScope("workflow_day", "bench", big, Decimal("0.8")),
        CeilingScope("tenant_month", "bench", big, Decimal("0.8")),
        CeilingScope("global_day", "", big, Decimal("0.8")),
    ]
    start.wait()
    began = time.perf_counter()
    for _ in range(count):
        held = ceiling_reserve(
            scopes=scopes,
            amount=Decimal("0.0009"),
            run_id=index,
            step_id=1,
            action="agent:bench",
            owner="bench",
            ttl=timedelta(minutes=5),
        )
        ceiling_settle(held.pk, Decimal("0.0004"))
    out.put(time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-client", type=int, default=2000)
    args = parser.parse_args()
    _database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    from policies.models import Reservation, SpendScope

    call_command("migrate", verbosity=0)
    print(f"{'clients':>8} {'reservations':>13} {'seconds':>8} {'reserve+settle/s':>17}")
    for clients in (1, 4):
        Reservation.objects.all().delete()
        SpendScope.objects.all().delete()
        connections.close_all()
        ctx = multiprocessing.get_context("fork")
        start, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_client, args=(i, args.per_client, start, out))
            for i in range(clients)
        ]
        for proc in procs:
            proc.start()
        time.sleep(1.0)
        began = time.perf_counter()
        start.set()
        for _ in procs:
            out.get(timeout=600)
        seconds = time.perf_counter() - began
        for proc in procs:
            proc.join()
        total = clients * args.per_client
        print(f"{clients:>8} {total:>13,} {seconds:>8.2f} {total / seconds:>17,.0f}")


if __name__ == "__main__":
    main()
