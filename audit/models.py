"""The append-only event log. Rows are written only by ``audit.services`` and never changed.

The hash chain, verification and export come in a later issue; the single write path is here
now so every state change already leaves its row, inside the transaction that made it.
"""

from typing import Any

from django.db import models

from audit.verbs import ActorType, Verb


class AuditEventQuerySet(models.QuerySet["AuditEvent"]):
    def update(self, **kwargs: Any) -> int:
        raise TypeError("audit events are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise TypeError("audit events are append-only")


class AuditEvent(models.Model):
    """One recorded change: who did what to which object, in which run and step, and when."""

    created_at = models.DateTimeField(db_index=True)
    actor_type = models.CharField(max_length=10, choices=ActorType.choices)
    actor_id = models.CharField(max_length=150, blank=True)
    # Not a PositiveSmallIntegerField: a CHECK constraint costs every insert, and verbs are an enum.
    verb = models.SmallIntegerField(choices=Verb.choices)
    object_type = models.CharField(max_length=40)
    object_id = models.CharField(max_length=64)
    run_id = models.BigIntegerField(null=True, blank=True)
    step_id = models.BigIntegerField(null=True, blank=True)
    trace_id = models.CharField(max_length=32, blank=True)
    payload_digest = models.CharField(max_length=64, blank=True)
    data = models.JSONField(default=dict, blank=True)

    objects = AuditEventQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["run_id", "id"], name="audit_run_idx")]

    def __str__(self) -> str:
        return f"{self.get_verb_display()} {self.object_type}:{self.object_id}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise TypeError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise TypeError("audit events are append-only")
