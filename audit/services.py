"""The only writer of audit events. Call inside the transaction that makes the change."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import ActorType, Verb
from infra.canonical import digest
from infra.sql import Batch, insert, insert_rows

#: The columns of an audit row, in the order :func:`audit_insert_from` takes them.
AUDIT_COLUMNS = (
    "created_at",
    "actor_type",
    "actor_id",
    "verb",
    "object_type",
    "object_id",
    "run_id",
    "step_id",
    "trace_id",
    "payload_digest",
    "data",
)


def payload_digest(payload: Any) -> str:
    """SHA-256 of the canonical JSON of ``payload`` ('' for None)."""
    return "" if payload is None else digest(payload)


def audit_insert_from(select_sql: str) -> str:
    """SQL that writes the audit rows ``select_sql`` produces (columns as :data:`AUDIT_COLUMNS`),
    for a statement that records its change in that same statement (a step's claim is one
    statement: the claim, the run's start and their audit rows)."""
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    return f"INSERT INTO {table} ({', '.join(AUDIT_COLUMNS)}) {select_sql}"


@dataclass
class Entry:
    """An audit event not yet written; services collect these and write them in one INSERT."""

    verb: Verb
    object_type: str
    object_id: Any
    actor_type: str = ActorType.SYSTEM
    actor_id: str = ""
    run_id: int | None = None
    step_id: int | None = None
    trace_id: str = ""
    payload: Any = None
    data: dict[str, Any] = field(default_factory=dict)


def audit_record_many(
    entries: Iterable[Entry], *, now: datetime | None = None, batch: Batch | None = None
) -> None:
    """Write the entries in one statement, inside the caller's transaction (or its batch,
    which is one transaction)."""
    rows = list(entries)
    if not rows:
        return
    if batch is None and not connection.in_atomic_block:
        raise RuntimeError("audit events must be written inside the transaction of the change")
    now = now or timezone.now()
    if batch is not None:
        # Straight to the JSON rows the batched INSERT takes (no model instances).
        at = now.isoformat()
        insert_rows(
            AuditEvent,
            [
                {
                    "created_at": at,
                    "actor_type": e.actor_type,
                    "actor_id": e.actor_id,
                    "verb": int(e.verb),
                    "object_type": e.object_type,
                    "object_id": str(e.object_id),
                    "run_id": e.run_id,
                    "step_id": e.step_id,
                    "trace_id": e.trace_id,
                    "payload_digest": payload_digest(e.payload),
                    "data": e.data,
                }
                for e in rows
            ],
            batch=batch,
        )
        return
    insert(
        AuditEvent,
        [
            AuditEvent(
                created_at=now,
                actor_type=e.actor_type,
                actor_id=e.actor_id,
                verb=e.verb,
                object_type=e.object_type,
                object_id=str(e.object_id),
                run_id=e.run_id,
                step_id=e.step_id,
                trace_id=e.trace_id,
                payload_digest=payload_digest(e.payload),
                data=e.data,
            )
            for e in rows
        ],
        returning=False,
        batch=batch,
    )


def audit_record(entry: Entry, *, now: datetime | None = None) -> None:
    audit_record_many([entry], now=now)


def audit_record_alone(entry: Entry, *, now: datetime | None = None) -> None:
    """Write one entry in a transaction of its own: for what is recorded although nothing
    changed (an access refused)."""
    with transaction.atomic():
        audit_record_many([entry], now=now)
