"""Who may see or do what is decided in ``orchestration.selectors`` only, so the API, the pages
and the websockets cannot disagree: none of them checks a permission itself."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "module",
    [
        "orchestration/api.py",
        "console/api.py",
        "console/views.py",
        "console/consumers.py",
        "policies/api.py",
        "console/views_policies.py",
    ],
)
def test_no_permission_check_outside_the_selectors(module: str) -> None:
    source = (ROOT / module).read_text()
    for needle in ("has_perm", "get_objects_for_user", "user_permissions", "is_superuser"):
        assert needle not in source, f"{module} checks permissions itself ({needle})"
