"""The main navigation for the logged-in user's role (a template context processor).

Links whose URL name does not exist (yet) are left out rather than breaking the page."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse

from policies.selectors import READ as POLICY_READ

#: (label, URL name or absolute path, who sees it)
OPERATOR_LINKS = [
    ("Home", "console:home"),
    ("Inbox", "console:inbox"),
    ("Runs", "console:run_list"),
]
ADMIN_LINKS = [
    ("Policies", "console:policy_list"),
    ("Users & grants", "admin:auth_user_changelist"),
    ("Tools", "console:tool_list"),
]
AUDITOR_LINKS = [("Runs", "console:run_list"), ("Audit", "console:audit")]


#: Permissions that change something: a user with none of them only reads (an auditor).
ACTING = {
    "orchestration.add_run",
    "orchestration.decide_run",
    "policies.edit_policy",
    "policies.review_policy",
    "policies.submit_runs",
    "policies.decide_runs",
}


def _perms(user: Any) -> set[str]:
    # The permissions a page has usually loaded already for its own checks (kept on the user for
    # the request by console.auth.SingleQueryModelBackend): the navigation costs no query then.
    return set(user.get_all_permissions())


def user_role(user: Any) -> str:
    """The name shown for the user's role, from what they may do."""
    if user.is_superuser:
        return "Superuser"
    perms = _perms(user)
    if "policies.edit_policy" in perms:
        return "Policy admin"
    for tier in (3, 2, 1):
        if f"orchestration.decide_tier_{tier}" in perms:
            return f"Operator tier {tier}"
    if perms & ACTING:
        return "Operator"
    return "Auditor" if "orchestration.view_run" in perms else "User"


def is_read_only(user: Any) -> bool:
    """Auditors read and never act: pages hide action buttons for them."""
    return not user.is_superuser and not (_perms(user) & ACTING)


def nav(request: HttpRequest) -> dict[str, Any]:
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    if is_read_only(user):
        wanted = list(AUDITOR_LINKS)
        if POLICY_READ in _perms(user):  # auditors read policies too (no actions on them)
            wanted.insert(1, ("Policies", "console:policy_list"))
    else:
        wanted = list(OPERATOR_LINKS)
        if "policies.edit_policy" in _perms(user) or user.is_staff or user.is_superuser:
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
