"""The pieces of ``make bench-policy`` (``tests.bench.policy_pairs``, issue 18: a policy in force
costs at most 15 % of throughput and latency): it reads the harness's own table, and its verdict
is the median pair's, on both measures."""

from __future__ import annotations

import pytest

from tests.bench.policy_pairs import Sample, parse, report

#: The harness's table as `tests.bench.run` prints it (`render`, plain form).
TABLE = """workload                        runs  runs/s  steps/s  p50 ms  p95 ms  p99 ms  write tx/run  broker msgs/run
------------------------------  ----  ------  -------  ------  ------  ------  ------------  ---------------
(c) single run, end to end      200   40      201      10.8    13.5    15.5    6.0           1.00
(a) 1,000 runs, Python service  1000  170     848      -       -       -       6.0           1.00
(c): load average after: 1.7
"""


def test_it_reads_throughput_and_latency_from_the_harness_table() -> None:
    assert parse(TABLE) == Sample(runs_per_second=170.0, p50_ms=10.8)
    with pytest.raises(ValueError, match=r"no \(a\) and \(c\) rows"):
        parse("workload  runs\n")


def test_the_verdict_is_the_median_pair_on_both_measures() -> None:
    none = Sample(200.0, 10.0)
    within = [(none, Sample(175.0, 11.0)), (none, Sample(178.0, 11.2)), (none, Sample(140, 14))]
    text = report(within, "demo")
    assert "| median | | -12.5% | | +12.0% |" in text and text.endswith("; met by the median pair")
    slow = [(none, Sample(175.0, 11.6)), (none, Sample(176.0, 11.7)), (none, Sample(190, 10.2))]
    assert report(slow, "demo").endswith("; not met by the median pair")  # latency +16 %
    few = [(none, Sample(160.0, 10.5)), (none, Sample(165.0, 10.5)), (none, Sample(199, 10.1))]
    assert report(few, "demo").endswith("; not met by the median pair")  # throughput -17.5 %
