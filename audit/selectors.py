"""Reads of the audit log."""

from __future__ import annotations

from django.db.models import QuerySet

from audit.models import AuditEvent


def audit_events_for_run(run_id: int) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(run_id=run_id).order_by("id")


def audit_events_for_object(object_type: str, object_id: int | str) -> QuerySet[AuditEvent]:
    """Every event about one object (a policy version's history), oldest first."""
    events = AuditEvent.objects.filter(object_type=object_type, object_id=str(object_id))
    return events.order_by("id")


def audit_event_exists(verb: int, object_type: str, object_id: object) -> bool:
    """Whether ``verb`` was ever recorded for this object (a warning given once, say)."""
    return AuditEvent.objects.filter(
        verb=verb, object_type=object_type, object_id=str(object_id)
    ).exists()


def audit_first_events(verb: int, object_type: str, object_ids: list[str]) -> dict[str, AuditEvent]:
    """The first ``verb`` event of each object (by id) that has one, in one query."""
    first: dict[str, AuditEvent] = {}
    if not object_ids:
        return first
    events = AuditEvent.objects.filter(verb=verb, object_type=object_type, object_id__in=object_ids)
    for event in events.order_by("id").only("object_id", "actor_id", "data"):
        first.setdefault(event.object_id, event)
    return first


def latest_audit_event_id() -> int:
    """The newest audit row's id. Every change to a run writes audit rows in its transaction
    and ids come from one database sequence, so this only grows, whichever process wrote them."""
    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0
