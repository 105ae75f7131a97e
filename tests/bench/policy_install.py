"""The policy a benchmark runs under, installed in the database Django is set up with. Has no
side effects on import (``tests.bench.run`` does: it points the environment at the benchmark's
database), so every benchmark can share it."""

from __future__ import annotations


def bench_policy_install(*, ceilings: bool = True) -> None:
    """The demo's policy in force, every rule and ceiling of it, with its ceilings' limits
    raised so that a benchmark's thousands of runs reserve and settle against them without
    reaching one (the demo's daily limits are sized for an hour of demo traffic); without
    ``ceilings``, its rules alone (every action decided and recorded, nothing reserved)."""
    from pathlib import Path

    import yaml

    import policies
    from policies.services import policy_install

    document = yaml.safe_load((Path(policies.__file__).parent / "demo_policy.yaml").read_text())
    for ceiling in document.get("ceilings", []):
        ceiling["limit"] = max(float(ceiling["limit"]), 1_000_000.0)
    if not ceilings:
        document.pop("ceilings", None)
    policy_install(source=yaml.safe_dump(document, sort_keys=False), note="benchmark")
