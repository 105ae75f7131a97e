"""What a policy costs in the engine's own Python, without the noise of several processes.

Runs the reference workload in ONE process: it submits a run and executes its steps itself as a
worker does (the claim with the wake-up hint, the local chain, the siblings it holds back and
claims), so the CPU time this process spends per run is the Python every run costs: submitting,
the engine and the worker. PostgreSQL's own work and the broker are left out, and so is the
other worker's share of two cores, which is what makes ``make bench-policy`` drift from pair to
pair. No policy and a policy (the demo's, or its rules alone) alternate, each in a fresh process
on a database of its own, ``--pairs`` times; it prints each pair's CPU and wall time per run and
the medians of the differences.

    python -m tests.bench.inprocess --pairs 4 --runs 200 [--policy demo|rules] [--profile DIR]

``--profile DIR`` writes a cProfile of each measured block (``DIR/<policy>-<pair>.prof``), to
compare function by function. Uses ``BENCH_PG`` (the server) and ``BENCH_REDIS_URL`` (a database
it empties) as ``tests.bench.run`` does, and databases named ``signalbox_bench_inprocess_*``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.policy_pairs import first_of

ROOT = Path(__file__).resolve().parents[2]
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
WARM_UP = 50


def database(policy: str) -> str:
    return f"signalbox_bench_inprocess_{policy}"


def child_env(policy: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "console.settings",
        "SIGNALBOX_ENV": "development",
        "DEBUG": "false",
        "DATABASE_URL": f"{PG}/{database(policy)}",
        "REDIS_URL": REDIS_URL,
        "SIGNALBOX_AGENT_TIME_SCALE": "0",
        "DB_CONN_MAX_AGE": "600",
        "LOG_LEVEL": "WARNING",
    }


def prepare(policy: str) -> None:
    """A fresh database for ``policy``, migrated, with the policy in force."""
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database(policy)}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database(policy)}"')
    env = child_env(policy)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    if policy != "none":
        subprocess.run(
            [sys.executable, "-m", "tests.bench.inprocess", "--install", policy],
            cwd=ROOT,
            env=env,
            check=True,
        )


def measure(policy: str, runs: int, profile: str | None) -> dict[str, float]:
    """One measured block in a process of its own: CPU and wall microseconds per run."""
    command = [sys.executable, "-m", "tests.bench.inprocess", "--child", "--runs", str(runs)]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(policy), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the {policy} block failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


# --- in the child process (Django set up on the policy's database) ------------------------------


def install(policy: str) -> None:
    import django

    django.setup()
    from tests.bench.policy_install import bench_policy_install

    bench_policy_install(ceilings=policy == "demo")


def child(runs: int, profile: str | None) -> None:
    import django

    django.setup()
    from orchestration.dispatch import hint_of
    from orchestration.models import Run, Step, StepStatus
    from orchestration.runtime import Runtime
    from orchestration.services import run_submit
    from orchestration.worker import execute

    rt = Runtime(pools=frozenset({"default", "research"}))
    worker_id = f"inprocess:{os.getpid()}"

    def one() -> int:
        run = run_submit(workflow="reference_workload", input={}).run
        while queued := list(Step.objects.filter(run_id=run.pk, status=StepStatus.QUEUED)):
            for step in queued:  # what a wake-up message carries: the step and its hint
                execute.step_execute(step.pk, rt=rt, worker_id=worker_id, hint=hint_of(step))
        return int(run.pk)

    for _ in range(WARM_UP):
        one()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu, wall = time.process_time(), time.perf_counter()
    ids = [one() for _ in range(runs)]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    measured: dict[str, float] = {"cpu_us": cpu * 1e6 / runs, "wall_us": wall * 1e6 / runs}
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
        import pstats

        # Python function calls per run: the same for the same code whatever the machine's
        # speed, so a change's effect shows even where its time is lost in the drift.
        measured["calls"] = pstats.Stats(profile).total_calls / runs
    done = Run.objects.filter(pk__in=ids, status="succeeded").count()
    if done != runs:
        raise SystemExit(f"only {done} of {runs} runs succeeded")
    print(json.dumps(measured))


# --- the parent ---------------------------------------------------------------------------------


def report(pairs: list[tuple[dict[str, float], dict[str, float]]], policy: str) -> str:
    lines = [
        f"| pair | CPU µs/run none → {policy} | cost | wall µs/run none → {policy} | cost |",
        "|---|---|---|---|---|",
    ]
    cpu, wall = [], []
    for n, (none, with_policy) in enumerate(pairs, 1):
        dc, dw = with_policy["cpu_us"] - none["cpu_us"], with_policy["wall_us"] - none["wall_us"]
        cpu.append(dc)
        wall.append(dw)
        lines.append(
            f"| {n} | {none['cpu_us']:.0f} → {with_policy['cpu_us']:.0f} | {dc:+.0f} µs "
            f"({dc / none['cpu_us']:+.1%}) | {none['wall_us']:.0f} → {with_policy['wall_us']:.0f}"
            f" | {dw:+.0f} µs ({dw / none['wall_us']:+.1%}) |"
        )
    lines.append(
        f"| median | | {statistics.median(cpu):+.0f} µs | | {statistics.median(wall):+.0f} µs |"
    )
    if all("calls" in side for pair in pairs for side in pair):
        none_calls = statistics.median(none["calls"] for none, _ in pairs)
        with_calls = statistics.median(with_policy["calls"] for _, with_policy in pairs)
        lines.append(
            f"\nPython calls per run (cProfile): {none_calls:.0f} → {with_calls:.0f}, "
            f"{with_calls - none_calls:+.0f} ({with_calls / none_calls - 1:+.1%})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=200, help="measured runs per block")
    parser.add_argument("--policy", choices=["demo", "rules"], default="demo")
    parser.add_argument("--profile", help="a directory for a cProfile of each block")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--install", choices=["demo", "rules"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.install:
        install(args.install)
        return
    if args.child:
        child(args.runs, args.profile)
        return
    import redis

    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    redis.Redis.from_url(REDIS_URL).flushdb()
    for policy in ("none", args.policy):
        prepare(policy)
    pairs = []
    try:
        for n in range(1, args.pairs + 1):
            got = {
                policy: measure(
                    policy,
                    args.runs,
                    str(Path(args.profile) / f"{policy}-{n}.prof") if args.profile else None,
                )
                for policy in first_of(n, args.policy)  # the pairs take turns at going first
            }
            pair = (got["none"], got[args.policy])
            print(
                f"pair {n}: CPU {pair[0]['cpu_us']:.0f} → {pair[1]['cpu_us']:.0f} µs/run, "
                f"wall {pair[0]['wall_us']:.0f} → {pair[1]['wall_us']:.0f} µs/run",
                flush=True,
            )
            pairs.append((pair[0], pair[1]))
    finally:
        redis.Redis.from_url(REDIS_URL).flushdb()
    print(report(pairs, args.policy))


if __name__ == "__main__":
    main()
