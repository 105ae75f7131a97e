"""Structured edits of a policy document, for the editor's forms: add or replace one rule,
allowlist, ceiling, time window or rate limit, and get the whole document back validated; pure.

An item replaces the one with the same identity (a rule's or rate limit's ``id``, an
allowlist's or window's name, a ceiling's scope and key) and is appended otherwise. A result
that is not a valid document raises :class:`DocumentEditError` with each problem as
``path: message`` (``rules[3].outcome.tier: must be 1, 2 or 3``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from policies.document import DocumentProblems, PolicyDocument, path_text

#: What each section's items are identified by.
SECTIONS = ("rules", "allowlists", "ceilings", "time_windows", "rate_limits")


class DocumentEditError(ValueError):
    """The edited document is not valid; ``problems`` lists ``path: message`` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def document_upsert(
    document: PolicyDocument, section: str, item: dict[str, Any], *, name: str = ""
) -> PolicyDocument:
    """``document`` with ``item`` added to ``section`` (or replacing the item it identifies);
    ``name`` is the key for the named sections (``allowlists``, ``time_windows``)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}")
    data = document.to_json()
    if section in ("allowlists", "time_windows"):
        if not name:
            raise DocumentEditError([f"{section}: a name is required"])
        data.setdefault(section, {})[name] = item
    else:
        items: list[dict[str, Any]] = list(data.get(section) or [])
        position = next(
            (index for index, old in enumerate(items) if _same(section, old, item)), None
        )
        if position is None:
            items.append(item)
        else:
            items[position] = item
        data[section] = items
    try:
        return PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise DocumentEditError(edit_problems(exc)) from None


def document_item(document: PolicyDocument, section: str, identity: str) -> dict[str, Any] | None:
    """One item of a section as JSON values, by its identity (``scope`` or ``scope key`` for a
    ceiling), or None."""
    data = document.to_json()
    if section in ("allowlists", "time_windows"):
        found = (data.get(section) or {}).get(identity)
        return dict(found) if isinstance(found, dict) else None
    for item in data.get(section) or []:
        if _identity(section, item) == identity:
            return dict(item)
    return None


def item_identities(document: PolicyDocument, section: str) -> list[str]:
    """The identities of a section's items, in document order."""
    data = document.to_json()
    if section in ("allowlists", "time_windows"):
        return list(data.get(section) or {})
    return [_identity(section, item) for item in data.get(section) or []]


def _identity(section: str, item: dict[str, Any]) -> str:
    if section == "ceilings":
        return f"{item.get('scope')} {item['key']}" if item.get("key") else str(item.get("scope"))
    return str(item.get("id"))


def _same(section: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    return _identity(section, old) == _identity(section, new)


def edit_problems(error: ValidationError) -> list[str]:
    """Each problem of a validation as ``path: message``."""
    problems: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, DocumentProblems):
            problems += [f"{path_text((*loc, *sub))}: {message}" for sub, message in cause.problems]
            continue
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{path_text(loc)}: {message}" if loc else message)
    return problems
