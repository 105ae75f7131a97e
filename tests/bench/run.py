"""`make bench`: the reference workload against PostgreSQL, Redis and real worker processes.

classify -> (research_a || research_b) -> draft -> [approval] -> publish, no-op agents, every
step durably committed. The web/API process, two worker processes, PostgreSQL and Redis share
the machine. Prints a table; ``--markdown`` prints it ready for docs/benchmarks.md.

  (a) 1,000 runs without the approval: runs/s and steps/s, submitted through the Python service
      and, separately, through the REST API;
  (b) 300 runs paused at the approval, then all approved by an API client as fast as it can:
      resume latency (decision committed -> publish step started) p50/p95/p99;
  (c) single-run end-to-end latency (submitted -> finished) over 200 sequential runs;
  and for each, PostgreSQL write transactions per run and broker messages per run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.policy_install import bench_policy_install

ROOT = Path(__file__).resolve().parents[2]
BENCH_DB = os.environ.get("BENCH_DATABASE", "signalbox_bench")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")


def bench_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        # The repository first; whatever the caller added after it (tests/bench/mechanisms.py
        # adds the directory that swaps a mechanism for the library's own, in every process).
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        "DJANGO_SETTINGS_MODULE": "console.settings",
        "SIGNALBOX_ENV": "development",
        "DEBUG": "false",
        "DATABASE_URL": f"{PG}/{BENCH_DB}",
        "REDIS_URL": REDIS_URL,
        "SIGNALBOX_AGENT_TIME_SCALE": "0",
        "DB_CONN_MAX_AGE": "600",
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


os.environ.update({k: v for k, v in bench_env().items() if k not in ("PYTHONPATH",)})
sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    name: str
    runs: int
    seconds: float = 0.0
    steps: int = 0
    write_tx: int = 0
    broker_msgs: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    #: Printed under the table: what else the row's numbers need to be read right.
    note: str = ""

    def rate(self) -> str:
        return f"{self.runs / self.seconds:,.0f}" if self.seconds else "-"

    def step_rate(self) -> str:
        return f"{self.steps / self.seconds:,.0f}" if self.seconds else "-"

    def pct(self, p: float) -> str:
        if not self.latencies_ms:
            return "-"
        data = sorted(self.latencies_ms)
        index = min(len(data) - 1, max(0, round(p / 100 * len(data)) - 1))
        return f"{data[index]:.1f}"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, env=bench_env(), stdout=subprocess.DEVNULL)


def reset_database() -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{BENCH_DB}"')
    sh(sys.executable, "manage.py", "migrate", "-v0")
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


class Processes:
    """Two worker processes and one ASGI web process, started for the whole benchmark."""

    def __init__(
        self,
        workers: int,
        live_events: bool,
        web_processes: int = 1,
        profile_dir: str | None = None,
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="signalbox-bench-"))
        env = bench_env(SIGNALBOX_LIVE_EVENTS=str(live_events).lower())
        if profile_dir:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
        for index in range(workers):
            # --profile-workers: each worker under cProfile, written when it shuts down warm.
            profiled = (
                ["-m", "cProfile", "-o", str(Path(profile_dir) / f"worker{index}.prof")]
                if profile_dir
                else []
            )
            self._start(
                [
                    sys.executable,
                    *profiled,
                    "-m",
                    "celery",
                    "-A",
                    "console",
                    "worker",
                    "-Q",
                    "pool.default,pool.research",
                    "-n",
                    f"bench{index}@%h",
                    "--pool",
                    "solo",
                    "--prefetch-multiplier",
                    "1",
                    "--without-mingle",
                    "--without-gossip",
                    "-l",
                    "info",
                ],
                env,
                f"worker{index}",
            )
        self.port = _free_port()
        web_env = {**env, "DB_POOL": "true", "DB_CONN_MAX_AGE": "0"}
        if web_processes > 1:
            # As deployed (deploy/gunicorn.conf.py): gunicorn with uvicorn workers, one per core.
            self._start(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "-c",
                    "deploy/gunicorn.conf.py",
                    "--bind",
                    f"127.0.0.1:{self.port}",
                    "console.asgi:application",
                ],
                {**web_env, "WEB_CONCURRENCY": str(web_processes)},
                "web",
            )
        else:
            self._start(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "console.asgi:application",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                web_env,
                "web",
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd: list[str], env: dict[str, str], name: str) -> None:
        log = (self.logdir / f"{name}.log").open("w")
        self.procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            workers_ready = all(" ready." in p.read_text() for p in self.logdir.glob("worker*.log"))
            try:
                web_ready = (
                    httpx.get(f"http://127.0.0.1:{self.port}/api/v1/health", timeout=1).status_code
                    < 500
                )
            except httpx.HTTPError:
                web_ready = False
            if workers_ready and web_ready:
                return
            time.sleep(0.2)
        raise RuntimeError(f"processes not ready; logs in {self.logdir}")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the workers, the web process, PostgreSQL and Redis (from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")

        def cpu(pid: int) -> float:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (
                    int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
                ) / tick
            except (OSError, IndexError, ValueError):
                return 0.0

        def named(name: str) -> list[int]:
            out = subprocess.run(
                ["pgrep", "-f", name], capture_output=True, text=True
            ).stdout.split()
            return [int(p) for p in out]

        def reaped(pid: int) -> float:
            """CPU of a process's children that exited (PostgreSQL backends that closed)."""
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[13]) + int(fields[14])) / tick
            except (OSError, IndexError, ValueError):
                return 0.0

        totals = {
            "workers": 0.0,
            "web": 0.0,
            "postgres": 0.0,
            "redis": 0.0,
            "bench": cpu(os.getpid()),
        }
        for proc in self.procs[:-1]:
            totals["workers"] += cpu(proc.pid)
        web = self.procs[-1].pid
        totals["web"] = cpu(web) + sum(cpu(int(p)) for p in _children(web))
        # This benchmark's database only (the machine's PostgreSQL serves other databases too),
        # plus the server's own WAL writer, background writer and checkpointer.
        shared = (
            "postgres: .*(walwriter|background writer|checkpointer)",
            f"postgres: .* {BENCH_DB} ",
        )
        totals["postgres"] = sum(cpu(p) for pattern in shared for p in named(pattern))
        # Backends that exited meanwhile (the web process' pool closes some) are counted by the
        # postmaster, which reaps them (with any other database's that ended, rare during a run).
        totals["postgres"] += sum(reaped(p) for p in named("bin/postgres -D"))
        totals["redis"] = sum(cpu(p) for p in named("redis-server"))
        return totals

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return out.stdout.split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counters:
    """PostgreSQL write transactions (transaction ids handed out) and broker publishes."""

    def __init__(self) -> None:
        import redis

        self.redis = redis.Redis.from_url(REDIS_URL)

    def xid(self) -> int:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            return int(cursor.fetchone()[0])

    def pushes(self) -> int:
        stats = self.redis.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("lpush", "rpush"))

    def snapshot(self) -> tuple[int, int]:
        return self.xid(), self.pushes()


def wait_all(run_ids: list[int], status: str, timeout: float = 600) -> float:
    """Block until every run has ``status``; returns the monotonic time it happened.

    Polls on one kept connection (a poller that reconnects makes PostgreSQL fork a backend
    50 times a second on the measured cores), and only the oldest runs still pending, a
    chunk at a time: runs finish roughly in submission order, so a poll costs a few primary
    key lookups instead of a scan of every run of the workload."""
    from django.db import connection

    deadline = time.monotonic() + timeout
    pending = list(run_ids)
    sql = "SELECT id, status, error_code, error_message FROM orchestration_run WHERE id = ANY(%s)"
    while time.monotonic() < deadline:
        chunk = pending[:100]
        with connection.cursor() as cursor:
            cursor.execute(sql, [chunk])
            rows = {row[0]: row[1:] for row in cursor.fetchall()}
        for run_id, (run_status, code, message) in rows.items():
            if run_status in ("failed", "cancelled") and run_status != status:
                raise RuntimeError(f"run {run_id} {run_status}: {code} {message}")
        done = {run_id for run_id, row in rows.items() if row[0] == status}
        pending = [run_id for run_id in chunk if run_id not in done] + pending[len(chunk) :]
        if not pending:
            return time.monotonic()
        if done and len(done) == len(chunk):
            continue  # that whole chunk is done: look at the next one at once
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {len(run_ids)} runs to be {status}")


def api_client(port: int) -> Any:
    import httpx
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from console.models import ApiToken

    user, _ = get_user_model().objects.get_or_create(username="bench")
    # Every engine permission, and every tenant's (submitting, seeing and deciding for it).
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label__in=["orchestration", "policies"])
    )
    _, raw = ApiToken.issue(user, "bench")
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}/api/v1",
        headers={"Authorization": f"Bearer {raw}"},
        timeout=30,
        limits=httpx.Limits(max_connections=16),
    )


def measure_throughput(name: str, submit_all: Any, counters: Counters) -> Row:
    """Submit runs with ``submit_all()`` (returns their ids) and time them until all succeeded."""
    xid0, push0 = counters.snapshot()
    start = time.monotonic()
    ids = submit_all()
    end = wait_all(ids, "succeeded")
    xid1, push1 = counters.snapshot()
    row = Row(name, len(ids), seconds=end - start, steps=len(ids) * 5)
    row.write_tx = xid1 - xid0 - 1
    row.broker_msgs = push1 - push0
    return row


def bench_throughput_service(n: int, counters: Counters) -> Row:
    from orchestration.services import run_submit

    def submit_all() -> list[int]:
        return [run_submit(workflow="reference_workload", input={}).run.pk for _ in range(n)]

    return measure_throughput("(a) 1,000 runs, Python service", submit_all, counters)


def bench_throughput_api(n: int, counters: Counters, client: Any) -> Row:
    def submit(i: int) -> int:
        body = {"workflow": "reference_workload", "input": {}, "idempotency_key": f"bench-{i}"}
        response = client.post("/runs", json=body)
        response.raise_for_status()
        return int(response.json()["id"])

    def submit_all() -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(submit, range(n)))

    return measure_throughput("(a) 1,000 runs, REST API", submit_all, counters)


def bench_resume(n: int, counters: Counters, client: Any) -> Row:
    from orchestration.models import Step, Wait
    from orchestration.services import run_submit

    row = Row("(b) 300 approvals, resume", n)
    ids = [
        run_submit(workflow="reference_workload", input={"needs_approval": True}).run.pk
        for _ in range(n)
    ]
    wait_all(ids, "waiting")
    waits = list(Wait.objects.filter(run_id__in=ids, status="open").values_list("pk", flat=True))
    assert len(waits) == n, len(waits)
    xid0, push0 = counters.snapshot()
    start = time.monotonic()

    def decide(wait_id: int) -> None:
        response = client.post(
            f"/approvals/{wait_id}/decide", json={"decision": "approve", "reason": "bench"}
        )
        response.raise_for_status()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decide, waits))
    end = wait_all(ids, "succeeded")
    xid1, push1 = counters.snapshot()
    row.seconds = end - start
    row.steps = n
    row.write_tx = xid1 - xid0 - 1
    row.broker_msgs = push1 - push0
    decided = dict(Wait.objects.filter(pk__in=waits).values_list("run_id", "decided_at"))
    started = dict(
        Step.objects.filter(run_id__in=ids, node="publish").values_list("run_id", "started_at")
    )
    row.latencies_ms = [(started[r] - decided[r]).total_seconds() * 1000 for r in ids]
    return row


def bench_single(n: int, counters: Counters) -> Row:
    from orchestration.models import Run
    from orchestration.services import run_submit

    row = Row("(c) single run, end to end", n)
    xid0, push0 = counters.snapshot()
    start = time.monotonic()
    ids = []
    for _ in range(n):
        run_id = run_submit(workflow="reference_workload", input={}).run.pk
        wait_all([run_id], "succeeded")
        ids.append(run_id)
    row.seconds = time.monotonic() - start
    xid1, push1 = counters.snapshot()
    row.steps = n * 5
    row.write_tx = xid1 - xid0 - 1 - 0
    row.broker_msgs = push1 - push0
    row.latencies_ms = [
        (finished - created).total_seconds() * 1000
        for created, finished in Run.objects.filter(pk__in=ids).values_list(
            "created_at", "finished_at"
        )
    ]
    return row


def render(rows: list[Row], markdown: bool) -> str:
    head = [
        "workload",
        "runs",
        "runs/s",
        "steps/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "write tx/run",
        "broker msgs/run",
    ]
    body = [
        [
            r.name,
            str(r.runs),
            r.rate(),
            r.step_rate(),
            r.pct(50),
            r.pct(95),
            r.pct(99),
            f"{r.write_tx / r.runs:.1f}",
            f"{r.broker_msgs / r.runs:.2f}",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--approvals", type=int, default=300)
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--web-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="web server processes (more than 1: gunicorn with uvicorn workers, as deployed)",
    )
    parser.add_argument("--decisions", type=int, default=600, help="approvals per decisions row")
    parser.add_argument(
        "--bulk-size",
        type=int,
        default=10,
        help="approvals per bulk call (0: single decisions only)",
    )
    parser.add_argument(
        "--decision-rate",
        type=float,
        default=300,
        help="approvals a second offered in the paced bulk row (0: no paced row)",
    )
    parser.add_argument("--push-rate", type=float, default=100, help="changes per second")
    parser.add_argument("--push-seconds", type=float, default=10)
    parser.add_argument("--consoles", type=int, default=20)
    parser.add_argument("--page-runs", type=int, default=100_000)
    parser.add_argument("--page-requests", type=int, default=20)
    parser.add_argument(
        "--no-live-events", action="store_true", help="measure without channel-layer events"
    )
    parser.add_argument(
        "--only",
        choices=["service", "api", "resume", "single", "decisions", "push", "pages"],
        action="append",
        help="decisions, push and pages are issue 19's targets; without --only, all run",
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--profile-workers",
        metavar="DIR",
        help=(
            "run the engine parts' workers under cProfile, each written to DIR/worker<N>.prof"
            " when it stops"
        ),
    )
    parser.add_argument(
        "--policy",
        choices=["none", "rules", "demo"],
        default="none",
        help=(
            "the policy in force: none; the demo's (policies/demo_policy.yaml), decided for"
            " every action; or its rules without its ceilings"
        ),
    )
    args = parser.parse_args()

    reset_database()
    import django

    django.setup()
    if args.policy != "none":
        bench_policy_install(ceilings=args.policy == "demo")
    only = set(args.only or ["service", "api", "resume", "single", "decisions", "push", "pages"])
    rows: list[Row] = []
    cpu_report: list[str] = []
    logdirs: list[str] = []
    counters = Counters()

    def measured(procs: Processes, label: str, runs: int, workload: Any) -> Any:
        """Run ``workload`` and note the CPU each kind of process spent per run meanwhile,
        and the machine's load (it is shared)."""
        before = procs.cpu_seconds()
        result = workload()
        after = procs.cpu_seconds()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        cpu_report.append(
            f"CPU ms per run during {label}: "
            + ", ".join(f"{k} {(after[k] - before[k]) * 1000 / runs:.1f}" for k in after)
            + f"; load average after: {load}"
        )
        return result

    engine_parts = only & {"service", "api", "resume", "single", "decisions"}
    if engine_parts:
        procs = Processes(
            args.workers,
            live_events=not args.no_live_events,
            web_processes=args.web_processes,
            profile_dir=args.profile_workers,
        )
        logdirs.append(str(procs.logdir))
        try:
            client = api_client(procs.port) if only & {"api", "resume", "decisions"} else None
            if "single" in only:
                bench_single(20, counters)  # warm-up: imports, connections, caches
                rows.append(
                    measured(procs, "(c)", args.single, lambda: bench_single(args.single, counters))
                )
            if "service" in only:
                rows.append(
                    measured(
                        procs,
                        "(a) via the service",
                        args.runs,
                        lambda: bench_throughput_service(args.runs, counters),
                    )
                )
            if "api" in only:
                rows.append(
                    measured(
                        procs,
                        "(a) via the REST API",
                        args.runs,
                        lambda: bench_throughput_api(args.runs, counters, client),
                    )
                )
            if "resume" in only:
                rows.append(bench_resume(args.approvals, counters, client))
            if "decisions" in only:
                from tests.bench.decisions import bench_decisions

                bench_decisions(40, counters, client)  # warm-up of every web process
                kinds = [(0, 0.0)]
                if args.bulk_size:
                    kinds.append((args.bulk_size, 0.0))
                    if args.decision_rate:  # and paced: resume latency at a load it sustains
                        kinds.append((args.bulk_size, args.decision_rate))
                for bulk, rate in kinds:
                    rows.append(
                        measured(
                            procs,
                            f"decisions (bulk {bulk}{f', {rate:.0f}/s' if rate else ''})",
                            args.decisions,
                            lambda bulk=bulk, rate=rate: bench_decisions(
                                args.decisions,
                                counters,
                                client,
                                bulk_size=bulk,
                                rate=rate,
                                cpu=procs.cpu_seconds,
                            ),
                        )
                    )
        finally:
            procs.stop()
    if "push" in only:
        from tests.bench.live_push import bench_push

        # No workers: the submitted runs stay queued, so the only changes are the driver's.
        procs = Processes(0, live_events=True, web_processes=args.web_processes)
        logdirs.append(str(procs.logdir))
        try:
            changes = int(args.push_rate * args.push_seconds)
            rows.append(
                measured(
                    procs,
                    "live push (per change)",
                    changes,
                    lambda: bench_push(
                        procs.port, args.push_rate, args.push_seconds, args.consoles
                    ),
                )
            )
        finally:
            procs.stop()
    if "pages" in only:
        from tests.bench.pages import bench_pages

        procs = Processes(args.workers, live_events=True, web_processes=args.web_processes)
        logdirs.append(str(procs.logdir))
        try:
            page_rows, counts = bench_pages(procs.port, args.page_runs, args.page_requests)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            for row in page_rows:
                row.note = f"load average after: {load}"
            rows.extend(page_rows)
            cpu_report.append(f"pages database: {counts}")
        finally:
            procs.stop()
    print(render(rows, args.markdown))
    for row in rows:
        if row.note:
            print(f"{row.name}: {row.note}")
    for line in cpu_report:
        print(line)
    print(
        f"\nlogs: {' '.join(logdirs)}; cores: {os.cpu_count()}; web processes: "
        f"{args.web_processes}; live events: {not args.no_live_events}"
    )


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
