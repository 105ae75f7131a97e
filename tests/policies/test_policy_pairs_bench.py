"""The pieces of ``make bench-policy`` (``tests.bench.policy_pairs``, issue 18: a policy in force
costs at most 15 % of throughput and latency): it reads the harness's rows, and its verdict
is the median pair's, on both measures. And its in-process companion
(``tests.bench.inprocess``), which reports the median pair's difference in Python time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.bench import inprocess
from tests.bench.policy_pairs import Sample, first_of, of_results, report


def test_it_reads_throughput_and_latency_from_the_harness_rows() -> None:
    rows = {"(c)": {"runs/s": 40.0, "p50": 10.8}, "(a)": {"runs/s": 170.0, "cpu workers": 5.0}}
    assert of_results(rows) == Sample(runs_per_second=170.0, p50_ms=10.8)
    with pytest.raises(ValueError, match=r"no \(a\) and \(c\) rows"):
        of_results({"(a)": {"runs/s": 170.0}})


def test_the_verdict_is_the_median_pair_on_both_measures() -> None:
    none = Sample(200.0, 10.0)
    within = [(none, Sample(175.0, 11.0)), (none, Sample(178.0, 11.2)), (none, Sample(140, 14))]
    text = report(within, "demo")
    assert "| median | | -12.5% | | +12.0% |" in text and text.endswith("; met by the median pair")
    slow = [(none, Sample(175.0, 11.6)), (none, Sample(176.0, 11.7)), (none, Sample(190, 10.2))]
    assert report(slow, "demo").endswith("; not met by the median pair")  # latency +16 %
    few = [(none, Sample(160.0, 10.5)), (none, Sample(165.0, 10.5)), (none, Sample(199, 10.1))]
    assert report(few, "demo").endswith("; not met by the median pair")  # throughput -17.5 %


def test_the_pairs_take_turns_at_going_first() -> None:
    # A machine speeding up or slowing down within each pair would otherwise always favour the
    # same side (the one run second, or the one run first).
    orders = [first_of(n, "demo") for n in range(1, 5)]
    assert orders == [("none", "demo"), ("demo", "none"), ("none", "demo"), ("demo", "none")]
    assert first_of(2, "rules") == ("rules", "none")


def test_the_in_process_report_gives_each_pair_and_the_median_difference() -> None:
    pairs = [
        ({"cpu_us": 7000.0, "wall_us": 11000.0}, {"cpu_us": 8000.0, "wall_us": 12500.0}),
        ({"cpu_us": 7200.0, "wall_us": 11200.0}, {"cpu_us": 7100.0, "wall_us": 11000.0}),
        ({"cpu_us": 6800.0, "wall_us": 10800.0}, {"cpu_us": 7400.0, "wall_us": 12000.0}),
    ]
    text = inprocess.report(pairs, "rules")
    assert "| 1 | 7000 → 8000 | +1000 µs (+14.3%) | 11000 → 12500 | +1500 µs (+13.6%) |" in text
    assert "| 2 | 7200 → 7100 | -100 µs (-1.4%) |" in text
    assert text.endswith("| median | | +600 µs | | +1200 µs |")
    profiled = [
        ({**none, "calls": 11200.0}, {**with_policy, "calls": calls})
        for (none, with_policy), calls in zip(pairs, [12000.0, 12100.0, 11900.0], strict=True)
    ]
    assert inprocess.report(profiled, "demo").endswith(
        "Python calls per run (cProfile): 11200 → 12000, +800 (+7.1%)"
    )


@pytest.mark.parametrize("module", ["tests.bench.policy_pairs", "tests.bench.inprocess"])
def test_importing_it_leaves_the_environment_alone(module: str) -> None:
    # The suite's worker processes inherit this process's environment: a module that pointed it
    # at the benchmark's broker (as importing tests.bench.run does) starves them of messages.
    check = (
        f"import os; before = dict(os.environ); import {module}; "
        "assert dict(os.environ) == before, sorted(set(os.environ.items()) ^ set(before.items()))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(REDIS_URL="redis://127.0.0.1:6379/15", DATABASE_URL="postgres://suite/test")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
