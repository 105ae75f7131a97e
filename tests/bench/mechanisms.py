"""What each of Signalbox's replacements of a library mechanism buys, measured interleaved.

    python -m tests.bench.mechanisms library-publish --pairs 4 --only single --only service

runs ``tests/bench/run.py`` in pairs: Signalbox as it is, and with one mechanism swapped back to
the library's own (``tests/bench/variants/sitecustomize.py`` does the swap in every process of
the run), alternating which of the two goes first. This machine's speed drifts by a factor of
two to three over a day, so only pairs run back to back are compared; the summary gives each
workload's values per pair, their medians and the median of the pairs' differences.

Variants: library-publish (``apply_async`` instead of ``infra.broker.TaskPublisher``),
library-asgi (Django's ASGIHandler and servestatic's middleware), library-static
(servestatic's middleware in the one-hop handler's synchronous chain), library-auth (the ORM's
token lookup and Django's ModelBackend), library-backend (Django's ModelBackend); several at
once separated by commas. (The variants of the broker mechanisms that were measured and
removed, kombu's QoS, kombu's client per command and no withdrawal, are in this file's
history.)

Each run gets a private ``redis-server`` (started here, stopped at the end) and its own
database (``BENCH_DATABASE``, default ``signalbox_bench_mechanisms``).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS_DIR = ROOT / "tests" / "bench" / "variants"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(
    variant: str | None, bench_args: list[str], redis_url: str
) -> dict[str, dict[str, float]]:
    """One ``tests/bench/run.py`` run: per workload, runs/s, p50 and CPU ms per run by process."""
    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    env.setdefault("BENCH_DATABASE", "signalbox_bench_mechanisms")
    env.pop("SIGNALBOX_BENCH_VARIANT", None)
    env["PYTHONPATH"] = str(ROOT)
    if variant:
        env["SIGNALBOX_BENCH_VARIANT"] = variant
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(VARIANTS_DIR)])
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--markdown", *bench_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"benchmark run failed ({variant or 'signalbox'}):\n{out.stdout}\n{out.stderr[-3000:]}"
        )
    results: dict[str, dict[str, float]] = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("("):
            key = cells[0].split(")")[0] + ")" + (" api" if "REST" in cells[0] else "")
            results[key] = {"runs/s": float(cells[2].replace(",", ""))}
            if cells[4] != "-":
                results[key].update(
                    {"p50": float(cells[4]), "p95": float(cells[5]), "p99": float(cells[6])}
                )
        cpu = re.match(r"CPU ms per run during (.+?): (.*)", line)
        if cpu:
            label = cpu.group(1)
            key = "(c)" if label == "(c)" else "(a) api" if "REST" in label else "(a)"
            for part in cpu.group(2).split(";")[0].split(", "):  # not the load average after
                name, value = part.rsplit(" ", 1)
                results.setdefault(key, {})[f"cpu {name}"] = float(value)
    return results


def summarize(
    variant: str, pairs: list[tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]]
) -> str:
    lines = [f"## {variant}: {len(pairs)} interleaved pairs (Signalbox → library)", ""]
    workloads = sorted({w for ours, _ in pairs for w in ours})
    for workload in workloads:
        metrics = sorted(
            {m for ours, lib in pairs for m in (ours.get(workload, {}) | lib.get(workload, {}))}
        )
        for metric in metrics:
            values = [
                (o[workload][metric], lib[workload][metric])
                for o, lib in pairs
                if metric in o.get(workload, {}) and metric in lib.get(workload, {})
            ]
            if not values:
                continue
            ours_values = [o for o, _ in values]
            lib_values = [b for _, b in values]
            diffs = [b - o for o, b in values]
            lines.append(
                f"{workload:8} {metric:14} ours {', '.join(f'{v:g}' for v in ours_values)} "
                f"(median {statistics.median(ours_values):g}) | library {', '.join(f'{v:g}' for v in lib_values)} "
                f"(median {statistics.median(lib_values):g}) | median difference library - ours "
                f"{statistics.median(diffs):+.2f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variant")
    parser.add_argument("--pairs", type=int, default=4)
    args, bench_args = parser.parse_known_args()
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
    redis_url = f"redis://127.0.0.1:{port}/0"
    pairs = []
    try:
        for index in range(args.pairs):
            order = [None, args.variant] if index % 2 == 0 else [args.variant, None]
            results = {name: one_run(name, bench_args, redis_url) for name in order}
            pairs.append((results[None], results[args.variant]))
            print(
                f"pair {index + 1}: ours {results[None]}\n        library {results[args.variant]}",
                flush=True,
            )
    finally:
        redis_server.terminate()
        redis_server.wait(10)
    print(summarize(args.variant, pairs))


if __name__ == "__main__":
    main()
