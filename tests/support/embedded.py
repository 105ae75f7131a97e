"""``manage.py`` of the embedded configuration (SQLite under a folder of the test's, no
DATABASE_URL), run in a process of its own, for tests of what the embedded demo's users do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def embedded_manage(var_dir: Path) -> Callable[..., str]:
    """A ``manage(*args, stdin="")`` that runs ``manage.py`` on the embedded database kept in
    ``var_dir`` and returns its output (the command must succeed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SIGNALBOX_ENV")}
    env.update(SIGNALBOX_VAR_DIR=str(var_dir), PYTHONPATH=str(ROOT))

    def manage(*args: str, stdin: str = "") -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    return manage
