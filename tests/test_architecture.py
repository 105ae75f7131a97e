"""What the layout promises, checked: one writer of audit rows, and layers that import-linter
enforces (its contracts are in pyproject.toml; `make test` runs `lint-imports` too)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ("console", "orchestration", "policies", "infra")


def _sources() -> list[Path]:
    return [p for app in APPS for p in (ROOT / app).rglob("*.py") if "migrations" not in p.parts]


def test_no_module_outside_the_audit_app_names_the_audit_table_or_model() -> None:
    # SQL that writes audit rows would name the table; ORM writes would name the model.
    pattern = re.compile(r"audit_auditevent|AuditEvent\b")
    offenders = [str(p.relative_to(ROOT)) for p in _sources() if pattern.search(p.read_text())]
    assert offenders == []


def test_the_audit_app_has_one_module_that_writes() -> None:
    writers = [
        p.name
        for p in (ROOT / "audit").glob("*.py")
        if re.search(r"\binsert(_rows)?\(|INSERT INTO|objects\.create\(|bulk_create", p.read_text())
    ]
    assert writers == ["services.py"]


def test_every_type_ignore_says_why() -> None:
    # A reason on the line itself (`# type: ignore[code]  # why`), so an upgrade that makes it
    # unnecessary is easy to judge.
    ignore = re.compile(r"#\s*type:\s*ignore(?!\[[^\]]+\]\s*#\s*\S)")
    offenders = [
        f"{p.relative_to(ROOT)}:{number}"
        for p in [*_sources(), *(ROOT / "audit").rglob("*.py")]
        if "migrations" not in p.parts
        for number, line in enumerate(p.read_text().splitlines(), 1)
        if ignore.search(line)
    ]
    assert offenders == []
