"""Focused measurements of single operations, Signalbox's way against the library's own,
alternating blocks in one process (so drift hits both alike):

    python -m tests.bench.micro publish   # one wake-up message: TaskPublisher vs apply_async
    python -m tests.bench.micro session   # a session request that checks a permission:
                                          # SingleQueryModelBackend vs Django's ModelBackend

Each block times ``--size`` operations; ``--blocks`` blocks of each, alternating. Prints the
per-operation medians (wall and CPU of this process) and the median of the blocks' differences.
Uses its own database (``BENCH_DATABASE``, default ``signalbox_bench_micro``) and a private
``redis-server``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(operation: Callable[[], object], size: int) -> tuple[float, float]:
    """Wall and CPU microseconds per operation over ``size`` operations."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(size):
        operation()
    return (time.perf_counter() - wall) * 1e6 / size, (time.process_time() - cpu) * 1e6 / size


def compare(
    ours: Callable[[], object], library: Callable[[], object], blocks: int, size: int
) -> None:
    for operation in (ours, library):  # warm up both
        timed(operation, max(1, size // 10))
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "library": []}
    for index in range(blocks):
        order = (
            [("ours", ours), ("library", library)]
            if index % 2 == 0
            else [("library", library), ("ours", ours)]
        )
        for name, operation in order:
            results[name].append(timed(operation, size))
    for kind, column in (("wall", 0), ("cpu", 1)):
        ours_values = [r[column] for r in results["ours"]]
        library_values = [r[column] for r in results["library"]]
        diffs = [b - o for o, b in zip(ours_values, library_values, strict=True)]
        print(
            f"{kind:4} µs/op: ours median {statistics.median(ours_values):.0f} "
            f"({min(ours_values):.0f}-{max(ours_values):.0f}), library median "
            f"{statistics.median(library_values):.0f} ({min(library_values):.0f}-{max(library_values):.0f}), "
            f"median of block differences {statistics.median(diffs):+.0f} ({blocks} blocks of {size})"
        )


def bench_publish(blocks: int, size: int) -> None:
    from django.conf import settings
    from kombu import Connection

    from console.celery import app
    from infra.broker import task_publisher
    from orchestration.tasks import step_execute

    app.conf.broker_url = settings.CELERY_BROKER_URL
    task = step_execute._get_current_object()
    publisher = task_publisher(app)
    assert publisher.usable(task)
    queue = "pool.micro"
    connection = Connection(settings.CELERY_BROKER_URL)
    producer = app.amqp.Producer(connection, auto_declare=False)
    print("one wake-up message (step_execute to a named queue):")
    compare(
        lambda: publisher.publish(task, [1], queue),
        # As the engine calls it: a queue by name, the app's producer (its pool, in production).
        lambda: task.apply_async(args=[1], queue=queue, producer=producer),
        blocks,
        size,
    )
    connection.close()


def bench_session(blocks: int, size: int) -> None:
    from django.contrib.auth.backends import ModelBackend
    from django.contrib.auth.models import Group, Permission
    from django.test import Client

    from console.auth import SingleQueryModelBackend
    from tests.factories import UserFactory

    operators = Group.objects.create(name="micro-operators")
    operators.permissions.add(*Permission.objects.filter(codename__in=["decide_run"]))
    user = UserFactory(username="micro", permissions=["orchestration.view_run"])
    user.groups.add(operators)
    client = Client()
    client.force_login(user)
    ours = SingleQueryModelBackend.get_all_permissions

    def request() -> None:
        response = client.get("/api/v1/runs?limit=1")
        assert response.status_code == 200, response.content

    def with_backend(method: Callable[..., set[str]]) -> Callable[[], None]:
        def run() -> None:
            SingleQueryModelBackend.get_all_permissions = method  # type: ignore[method-assign]
            request()

        return run

    print("a session-authenticated GET /api/v1/runs?limit=1 (loads the user, checks a permission):")
    compare(with_backend(ours), with_backend(ModelBackend.get_all_permissions), blocks, size)
    SingleQueryModelBackend.get_all_permissions = ours  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["publish", "session"])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--size", type=int, default=500)
    args = parser.parse_args()
    port = free_port()
    redis_server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    os.environ.setdefault("BENCH_DATABASE", "signalbox_bench_micro")
    os.environ["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    try:
        from tests.bench import run  # sets the benchmark's environment

        run.reset_database()
        import django

        django.setup()
        {"publish": bench_publish, "session": bench_session}[args.what](args.blocks, args.size)
    finally:
        redis_server.terminate()
        redis_server.wait(10)


if __name__ == "__main__":
    main()
