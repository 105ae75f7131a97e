"""Reads of the audit log."""

from __future__ import annotations

from django.db.models import QuerySet

from audit.models import AuditEvent


def audit_events_for_run(run_id: int) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(run_id=run_id).order_by("id")
