"""Issue 18's target as one command: what the demo policy costs against no policy.

Runs the reference workload's (a) throughput and (c) single-run latency (``tests.bench.run
--only service --only single``) with no policy and with the demo policy, alternately, ``--pairs``
times, each run a process of its own on a fresh database, and prints each pair's cost and the
median of them. This machine's speed drifts by several percent within minutes, so only pairs
run back to back are compared, and the verdict is the median pair's. The pairs take turns at
which of the two runs first (:func:`first_of`): a machine that speeds up or slows down over a
pair then favours neither side.

    python -m tests.bench.policy_pairs --pairs 6            # or: make bench-policy
    python -m tests.bench.policy_pairs --policy rules       # the rules alone, no ceilings
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass

from tests.bench.mechanisms import one_run

#: The harness's own default broker (``tests.bench.run``, which is not imported here: importing it
#: points this process's environment at the benchmark's database and broker).
REDIS_URL = "redis://127.0.0.1:6379/10"

#: The issue's allowance: a policy in force costs at most this share of throughput and latency.
ALLOWED = 0.15


def first_of(n: int, policy: str) -> tuple[str, str]:
    """The order of pair ``n``'s two runs (from 1): without the policy first in odd pairs,
    with it first in even ones."""
    return ("none", policy) if n % 2 else (policy, "none")


@dataclass(frozen=True)
class Sample:
    runs_per_second: float
    p50_ms: float


def sample(policy: str, extra: list[str]) -> Sample:
    """One run of the harness with ``policy`` in force: (a)'s runs/s and (c)'s p50."""
    results = one_run(
        None,
        ["--only", "service", "--only", "single", "--policy", policy, *extra],
        os.environ.get("BENCH_REDIS_URL", REDIS_URL),
    )
    return of_results(results)


def of_results(results: dict[str, dict[str, float]]) -> Sample:
    """(a)'s runs/s and (c)'s p50 from what ``tests.bench.mechanisms.one_run`` read."""
    try:
        return Sample(runs_per_second=results["(a)"]["runs/s"], p50_ms=results["(c)"]["p50"])
    except KeyError:
        raise ValueError(f"no (a) and (c) rows in the harness's output: {results}") from None


def report(pairs: list[tuple[Sample, Sample]], policy: str) -> str:
    lines = [
        f"| pair | (a) runs/s none → {policy} | cost | (c) p50 ms none → {policy} | cost |",
        "|---|---|---|---|---|",
    ]
    throughput, latency = [], []
    for n, (none, with_policy) in enumerate(pairs, 1):
        t = with_policy.runs_per_second / none.runs_per_second - 1
        lat = with_policy.p50_ms / none.p50_ms - 1
        throughput.append(t)
        latency.append(lat)
        lines.append(
            f"| {n} | {none.runs_per_second:.0f} → {with_policy.runs_per_second:.0f} | {t:+.1%} "
            f"| {none.p50_ms:.1f} → {with_policy.p50_ms:.1f} | {lat:+.1%} |"
        )
    mt, ml = statistics.median(throughput), statistics.median(latency)
    lines.append(f"| median | | {mt:+.1%} | | {ml:+.1%} |")
    met = -mt <= ALLOWED and ml <= ALLOWED
    lines.append(
        f"\nallowed: {ALLOWED:.0%} of throughput and of latency; "
        f"{'met' if met else 'not met'} by the median pair"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--policy", choices=["demo", "rules"], default="demo")
    args, extra = parser.parse_known_args()
    pairs = []
    for n in range(1, args.pairs + 1):
        order = first_of(n, args.policy)
        got = {policy: sample(policy, extra) for policy in order}
        none, with_policy = got["none"], got[args.policy]
        pairs.append((none, with_policy))
        print(
            f"pair {n} ({order[0]} first): {none.runs_per_second:.0f} → "
            f"{with_policy.runs_per_second:.0f} runs/s,"
            f" p50 {none.p50_ms:.1f} → {with_policy.p50_ms:.1f} ms",
            flush=True,
        )
    print(report(pairs, args.policy))


if __name__ == "__main__":
    main()
