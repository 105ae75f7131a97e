"""A setting given a value it cannot take stops the process at start-up with a message that
names the variable and what it must be (not a bare ``ValueError``), and a good value starts."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def settings_import(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import console.settings as s; print(repr(s.SIGNALBOX))"],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SIGNALBOX_CEILING_SETTLE_SECONDS", "soon", "must be a number, not 'soon'"),
        ("SIGNALBOX_CEILING_SETTLE_SECONDS", "0", "must be above 0 and at most 10"),
        ("SIGNALBOX_CEILING_SETTLE_SECONDS", "11", "must be above 0 and at most 10"),
        ("SIGNALBOX_CEILING_SETTLE_TOGETHER", "1.5", "must be a whole number, not '1.5'"),
        ("SIGNALBOX_CEILING_SETTLE_TOGETHER", "0", "must be between 1 and 100"),
        ("SIGNALBOX_CEILING_BLOCK_CALLS", "101", "must be between 1 and 100"),
        ("SIGNALBOX_LEASE_SECONDS", "", "must be a number, not ''"),
    ],
)
def test_a_bad_value_is_refused_by_name(variable: str, value: str, message: str):
    result = settings_import(**{variable: value})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("django.core.exceptions.ImproperlyConfigured: ")
    assert f"{variable} {message}" in last


def test_good_values_are_taken():
    result = settings_import(
        SIGNALBOX_CEILING_SETTLE_SECONDS="2.5", SIGNALBOX_CEILING_SETTLE_TOGETHER="1"
    )
    assert result.returncode == 0, result.stderr
    taken = ast.literal_eval(result.stdout)
    assert taken["CEILING_SETTLE_TOGETHER"] == 1
    assert taken["CEILING_SETTLE_SECONDS"] == 2.5
