"""Who may see or do what is decided in the selectors only (``orchestration.selectors``,
``policies.selectors``, ``policies.spend_selectors``), so the API, the pages, the websockets and
the services cannot disagree: none of them checks a permission itself."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SELECTORS = {
    "orchestration/selectors.py",
    "policies/selectors.py",
    "policies/spend_selectors.py",
}
#: Modules that read permissions for something other than deciding access, and why.
NOT_AUTHORIZATION = {
    # The authentication backend: it is what answers has_perm.
    "console/auth.py",
    # Django's admin: its own permission model for staff.
    "console/admin.py",
    # Which links the navigation shows; every page behind a link still asks a selector.
    "console/nav.py",
    # Demo data and service accounts: users created with their permissions (grants, not checks).
    "console/demo.py",
    "console/accounts.py",
}
NEEDLES = ("has_perm", "get_objects_for_user", "user_permissions", "is_superuser")


def _modules() -> list[str]:
    found = []
    for app in ("console", "orchestration", "policies", "audit"):
        for path in sorted((ROOT / app).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if "migrations" in path.parts or name in SELECTORS | NOT_AUTHORIZATION:
                continue
            found.append(name)
    return found


def test_the_api_pages_websockets_and_services_are_all_checked() -> None:
    modules = set(_modules())
    for module in (
        "orchestration/api.py",
        "console/api.py",
        "console/views.py",
        "console/views_inbox.py",
        "console/consumers.py",
        "policies/api.py",
        "policies/spend_api.py",
        "orchestration/services.py",
        "policies/ledger.py",
    ):
        assert module in modules


@pytest.mark.parametrize("module", _modules())
def test_no_permission_check_outside_the_selectors(module: str) -> None:
    source = (ROOT / module).read_text()
    for needle in NEEDLES:
        assert needle not in source, f"{module} checks permissions itself ({needle})"
