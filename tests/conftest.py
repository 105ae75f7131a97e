"""Shared fixtures: real Celery worker processes against the test database, and waiting helpers.

Worker processes are started with the same settings module and environment as the tests, with
``DATABASE_URL`` pointing at pytest-django's test database, so what they commit the tests see
(tests that use them need ``django_db(transaction=True)``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _blocks_settled_when_flushed(settings: Any) -> Iterator[None]:
    """Budget blocks an in-process chain is done with wait until a test flushes them
    (``runtime_for(pools).settling.flush()``), never for the background thread, whose own
    connection cannot see a test's uncommitted rows; none is left over for the next test.
    Worker processes keep the default delay."""
    from tests.support.engine import runtimes_forget_settlements

    settings.SIGNALBOX = {**settings.SIGNALBOX, "CEILING_SETTLE_SECONDS": 60.0}
    yield
    runtimes_forget_settlements()


@pytest.fixture(autouse=True)
def _tenants_forgotten() -> Iterator[None]:
    """Each test starts with no tenant cached: a transactional test's flush removes the rows."""
    from policies.active import active_forget
    from policies.tenants import tenants_forget

    tenants_forget()
    active_forget()
    yield
    tenants_forget()
    active_forget()


def pytest_configure(config: pytest.Config) -> None:
    if settings.SIGNALBOX_ENV != "test":
        raise pytest.UsageError("run the tests with SIGNALBOX_ENV=test (use `make test`)")


class WorkerProcess:
    """One `celery worker` process (with its pool children) serving some pools."""

    def __init__(
        self,
        name: str,
        pools: list[str],
        concurrency: int,
        extra_env: dict[str, str],
        *,
        wait: bool = True,
    ):
        """Start it; with ``wait`` (the default), return once it is ready (else call
        :meth:`wait_ready`)."""
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"worker-{name}-", suffix=".log")[1])
        env = {**os.environ, **extra_env}
        db = settings.DATABASES["default"]
        env["DATABASE_URL"] = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        env["PYTHONPATH"] = str(ROOT)
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "console",
            "worker",
            "-Q",
            ",".join(f"pool.{p}" for p in pools),
            "-n",
            f"{name}@%h",
            "-c",
            str(concurrency),
            "--pool",
            "prefork",
            "--prefetch-multiplier",
            "1",
            "--without-mingle",
            "--without-gossip",
            "-l",
            "info",
        ]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited: {self.log()}")
            if " ready." in self.log_path.read_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def pids(self) -> set[int]:
        """The main process and its pool children (their pids appear in step lease owners)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        )
        return {self.proc.pid, *(int(p) for p in out.stdout.split())}

    def kill(self) -> None:
        """SIGKILL the whole process group: no cleanup, no acks, as a crashed machine."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self) -> None:
        """A warm shutdown (SIGTERM), as a deploy stops a worker; SIGKILL after 15 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def _broker_clean(django_db_setup: Any) -> None:
    """Start every session with an empty test broker (the Redis database in REDIS_URL)."""
    import redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()


@pytest.fixture
def start_worker(_broker_clean: None) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes for this test; they are stopped (or found killed) at its end."""
    started: list[WorkerProcess] = []

    def start(
        name: str = "w",
        pools: list[str] | None = None,
        concurrency: int = 2,
        *,
        wait: bool = True,
        **extra_env: str,
    ) -> WorkerProcess:
        env = {
            "SIGNALBOX_AGENT_TIME_SCALE": "0",
            "SIGNALBOX_LEASE_SECONDS": "3",
            "SIGNALBOX_LIVE_EVENTS": "false",
        }
        env.update(extra_env)
        worker = WorkerProcess(name, pools or ["default", "research"], concurrency, env, wait=wait)
        started.append(worker)
        return worker

    yield start
    # The test is over: nothing a worker does now is looked at, so it is killed rather than
    # given the seconds of a warm shutdown (tests of shutdown call ``stop`` themselves).
    for worker in started:
        worker.kill()


@pytest.fixture
def workers(start_worker: Callable[..., WorkerProcess]) -> list[WorkerProcess]:
    """Two worker processes serving every pool, as production runs them (started together)."""
    both = [start_worker("w1", wait=False), start_worker("w2", wait=False)]
    for worker in both:
        worker.wait_ready()
    return both


@pytest.fixture
def fast_agents(settings: Any) -> None:
    """Demo agents take no wall time in this (test) process."""
    settings.SIGNALBOX = {**settings.SIGNALBOX, "AGENT_TIME_SCALE": 0.0, "LIVE_EVENTS": False}


#: An operator of every tenant and workflow, with the highest tier (tests of tiers and object
#: permissions build narrower users).
OPERATOR_PERMISSIONS = [
    "orchestration.view_run",
    "orchestration.decide_run",
    "orchestration.add_run",
    "orchestration.decide_workflow",
    "orchestration.decide_tier_1",
    "orchestration.decide_tier_2",
    "orchestration.decide_tier_3",
    "policies.submit_runs",
    "policies.view_runs",
    "policies.decide_runs",
]
ALL_POOLS = frozenset({"default", "research"})


@pytest.fixture
def operator(db: None) -> Any:
    from tests.factories import UserFactory

    return UserFactory(username="operator", permissions=OPERATOR_PERMISSIONS)


@pytest.fixture
def viewer(db: None) -> Any:
    """Sees every run (as operators, admins and auditors do); may not decide or submit."""
    from tests.factories import UserFactory

    return UserFactory(username="viewer", permissions=["orchestration.view_run"])


@pytest.fixture
def submitter(db: None) -> Any:
    """May submit runs and sees only their own."""
    from tests.factories import UserFactory

    return UserFactory(
        username="submitter", permissions=["orchestration.add_run", "policies.submit_runs"]
    )


@pytest.fixture
def requester(db: None) -> Any:
    """Submits work for every tenant (the person who asks); may decide nothing. Runs that wait
    for approval are submitted by them: nobody may approve a run they submitted themselves."""
    from tests.factories import UserFactory

    return UserFactory(
        username="requester", permissions=["orchestration.add_run", "policies.submit_runs"]
    )


@pytest.fixture
def stranger(db: None) -> Any:
    """Authenticated, without any permission."""
    from tests.factories import UserFactory

    return UserFactory(username="stranger")


@pytest.fixture
def drive() -> Callable[[int], Any]:
    """Run a run's queued steps in this process (and what they unlock) until none is queued;
    returns the run. The real engine, without worker processes."""
    from django.utils import timezone

    from orchestration.models import Run, Step, StepStatus
    from tests.support.engine import step_execute

    def run_queued(run_id: int) -> Any:
        for _ in range(50):
            # Steps not due yet (a retry's backoff, a deferred action) are left for later.
            queued = list(
                Step.objects.filter(
                    run_id=run_id, status=StepStatus.QUEUED, available_at__lte=timezone.now()
                ).values_list("pk", flat=True)
            )
            if not queued:
                return Run.objects.get(pk=run_id)
            for step_id in queued:
                step_execute(step_id, worker_id="t", pools=ALL_POOLS)
        raise AssertionError(f"run {run_id} still has queued steps after 50 rounds")

    return run_queued


def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
        connection.close()


def wait_for_run(
    run_id: int,
    statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout: float = 30.0,
) -> Any:
    from orchestration.models import Run

    return wait_until(
        lambda: Run.objects.filter(pk=run_id, status__in=statuses).first(),
        timeout=timeout,
        what=f"run {run_id} to reach {statuses}",
    )
