"""The main navigation for the logged-in user's role (a template context processor).

Links whose URL name does not exist (yet) are left out rather than breaking the page."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse

from policies.roles import ROLES

#: (label, URL name or absolute path, who sees it)
OPERATOR_LINKS = [("Home", "console:home"), ("Inbox", "console:inbox"), ("Runs", "console:run_list")]
ADMIN_LINKS = [
    ("Policies", "console:policy_list"),
    ("Users & grants", "admin:auth_user_changelist"),
    ("Tools", "console:tool_list"),
]
AUDITOR_LINKS = [("Runs", "console:run_list"), ("Audit", "console:audit")]


def group_names(user: Any) -> set[str]:
    """The user's group names, read once per request (kept on the user object)."""
    if not hasattr(user, "_sbx_group_names"):
        user._sbx_group_names = set(user.groups.values_list("name", flat=True))
    return user._sbx_group_names  # type: ignore[no-any-return]


def user_role(user: Any) -> str:
    """The name shown for the user's role: their standard group(s), or staff/superuser."""
    names = [name for name in group_names(user) if name in ROLES]
    if names:
        return ", ".join(sorted(names))
    if user.is_superuser:
        return "Superuser"
    return "Staff" if user.is_staff else "User"


def is_read_only(user: Any) -> bool:
    """Auditors read and never act: pages hide action buttons for them."""
    names = group_names(user)
    return "Auditor" in names and not (names - {"Auditor"}) and not user.is_superuser


def nav(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    groups = group_names(user)
    if is_read_only(user):
        wanted = list(AUDITOR_LINKS)
    else:
        wanted = list(OPERATOR_LINKS)
        if "Policy admin" in groups or user.is_staff or user.is_superuser:
            wanted += ADMIN_LINKS
    current = getattr(getattr(request, "resolver_match", None), "view_name", None)
    links = []
    seen = set()
    for label, name in wanted:
        try:
            url = reverse(name)
        except NoReverseMatch:
            continue
        if url in seen:
            continue
        seen.add(url)
        links.append({"label": label, "url": url, "current": name == current})
    return {
        "nav_links": links,
        "nav_role": user_role(user),
        "read_only": is_read_only(user),
        "user_time_zone": getattr(request, "user_time_zone", "UTC"),
    }
