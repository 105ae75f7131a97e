"""Alerts about open approvals and escalations at or above ``SIGNALBOX_NOTIFY_MIN_TIER``: an
email to the people who may decide the item and a Slack-compatible webhook, with a deep link.

Delivered by a periodic scan from this (top) layer, not from the engine: the engine never
imports the console, and nothing on its hot path waits for a mail server. The scan

1. claims the waits to notify by inserting one ``Notification`` row per (wait, channel, tier
   reached); the unique constraint makes a second scanner's insert a no-op, so an item is
   announced once per tier however many schedulers run;
2. claims each due row with a conditional UPDATE (``pending``/expired ``sending`` → ``sending``)
   so only one scanner sends it, and one that dies mid-send is taken over after a lease;
3. sends it; success is audited NOTIFICATION_SENT, a failure is retried with exponential
   backoff and, after the last attempt, audited NOTIFICATION_FAILED.

A scan is a row claim and idempotent, so it also catches up after an outage, which a task
queued on commit would not."""

from __future__ import annotations

import json
import logging
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import CharField, Exists, OuterRef, Q, Value
from django.db.models.functions import Cast, Concat
from django.utils import timezone

from audit.services import Entry, audit_record_many
from audit.verbs import Verb
from console.models import Notification, NotificationChannel, NotificationStatus
from orchestration.models import Wait, WaitKind, WaitStatus
from orchestration.selectors import wait_refusal

log = logging.getLogger(__name__)

#: How long a scanner holds a row it is sending before another may take it over.
SEND_LEASE = timedelta(minutes=2)


@dataclass
class ScanResult:
    queued: int = 0
    sent: int = 0
    retried: int = 0
    failed: int = 0


def deep_link(wait: Wait) -> str:
    return f"{settings.SIGNALBOX_BASE_URL.rstrip('/')}/inbox/{wait.pk}/"


def channels() -> list[str]:
    wanted = [NotificationChannel.EMAIL.value]
    if settings.SIGNALBOX_NOTIFY_WEBHOOK_URL:
        wanted.append(NotificationChannel.WEBHOOK.value)
    return wanted


def notifications_queue(now: datetime) -> int:
    """Insert the rows for every open item at or above the minimum tier not yet announced at
    its tier; returns how many were new."""
    min_tier = settings.SIGNALBOX_NOTIFY_MIN_TIER
    rows: list[Notification] = []
    for channel in channels():
        announced = Notification.objects.filter(
            wait_id=OuterRef("pk"), channel=channel, reason=_tier_reason_expr()
        )
        waits = (
            Wait.objects.filter(
                status=WaitStatus.OPEN,
                kind__in=[WaitKind.APPROVAL, WaitKind.ESCALATION],
                tier__gte=min_tier,
            )
            .annotate(announced=Exists(announced))
            .filter(announced=False)
            .values_list("pk", "tier")[:500]
        )
        rows += [
            Notification(
                wait_id=pk,
                channel=channel,
                reason=f"tier-{tier}",
                next_attempt_at=now,
                created_at=now,
            )
            for pk, tier in waits
        ]
    created = Notification.objects.bulk_create(rows, ignore_conflicts=True)
    return len(created)


def _tier_reason_expr() -> Any:
    return Concat(Value("tier-"), Cast(OuterRef("tier"), CharField()))


def _claim(pk: int, now: datetime) -> Notification | None:
    """Take one due row for this scanner, or None if another has it (or it is done)."""
    due = Q(
        pk=pk,
        next_attempt_at__lte=now,
        status__in=[NotificationStatus.PENDING, NotificationStatus.SENDING],
    )
    if not Notification.objects.filter(due).update(
        status=NotificationStatus.SENDING, next_attempt_at=now + SEND_LEASE
    ):
        return None
    return Notification.objects.select_related("wait__run").get(pk=pk)


def _text(wait: Wait) -> tuple[str, str]:
    run = wait.run
    what = "Escalation" if wait.kind == WaitKind.ESCALATION else "Approval"
    drill = "[DRILL] " if run.is_drill else ""
    why = (
        f"SLA breached {wait.sla_breaches}x, now tier {wait.tier}"
        if wait.sla_breaches
        else f"tier {wait.tier}"
    )
    subject = f"{drill}{what} needs a decision: {run.workflow_name} run {run.pk} ({why})"
    body = f"{subject}\n\n{wait.reason or wait.name}\n\nDecide it: {deep_link(wait)}\n"
    return subject, body


def recipients(wait: Wait) -> list[str]:
    """The people who may decide this item (tier, tenant, workflow), plus the configured list."""
    users = get_user_model().objects.filter(is_active=True).exclude(email="")
    addresses = [u.email for u in users if wait_refusal(u, wait) is None]
    return sorted({*addresses, *settings.SIGNALBOX_NOTIFY_EMAILS})


def _send_email(wait: Wait) -> None:
    to = recipients(wait)
    if not to:
        raise RuntimeError("nobody to email: no one with an address may decide this item")
    subject, body = _text(wait)
    send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, to, fail_silently=False)


def webhook_payload(wait: Wait) -> dict[str, Any]:
    subject, _ = _text(wait)
    link = deep_link(wait)
    return {
        "text": f"{subject} <{link}|Open in Signalbox>",
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*{subject}*\n{wait.reason or wait.name}"},
            },
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in Signalbox"},
                        "url": link,
                    }
                ],
            },
        ],
    }


def _send_webhook(wait: Wait) -> None:
    request = urllib.request.Request(
        settings.SIGNALBOX_NOTIFY_WEBHOOK_URL,
        data=json.dumps(webhook_payload(wait)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _deliver(note: Notification, now: datetime, result: ScanResult) -> None:
    wait = note.wait
    try:
        if note.channel == NotificationChannel.EMAIL:
            _send_email(wait)
        else:
            _send_webhook(wait)
    except Exception as exc:
        _failed(note, wait, f"{type(exc).__name__}: {exc}"[:1000], now, result)
        return
    with transaction.atomic():
        Notification.objects.filter(pk=note.pk).update(
            status=NotificationStatus.SENT, attempts=note.attempts + 1, sent_at=now, last_error=""
        )
        audit_record_many(
            [_entry(Verb.NOTIFICATION_SENT, note, wait, attempts=note.attempts + 1)], now=now
        )
    result.sent += 1


def _failed(note: Notification, wait: Wait, error: str, now: datetime, result: ScanResult) -> None:
    attempts = note.attempts + 1
    log.warning(
        "notification %s (%s, wait %s) failed, attempt %s: %s",
        note.pk,
        note.channel,
        wait.pk,
        attempts,
        error,
    )
    if attempts < settings.SIGNALBOX_NOTIFY_MAX_ATTEMPTS:
        backoff = timedelta(seconds=settings.SIGNALBOX_NOTIFY_BACKOFF_SECONDS * 2 ** (attempts - 1))
        Notification.objects.filter(pk=note.pk).update(
            status=NotificationStatus.PENDING,
            attempts=attempts,
            next_attempt_at=now + backoff,
            last_error=error,
        )
        result.retried += 1
        return
    with transaction.atomic():
        Notification.objects.filter(pk=note.pk).update(
            status=NotificationStatus.FAILED, attempts=attempts, last_error=error
        )
        audit_record_many(
            [_entry(Verb.NOTIFICATION_FAILED, note, wait, attempts=attempts, error=error)], now=now
        )
    result.failed += 1


def _entry(verb: Verb, note: Notification, wait: Wait, **data: Any) -> Entry:
    return Entry(
        verb=verb,
        object_type="notification",
        object_id=note.pk,
        run_id=wait.run_id,
        step_id=wait.step_id,
        trace_id=wait.run.trace_id,
        data={
            "wait": wait.pk,
            "channel": note.channel,
            "reason": note.reason,
            "tier": wait.tier,
            **data,
        },
    )


def notifications_scan(now: datetime | None = None, *, limit: int = 100) -> ScanResult:
    """One pass: queue what is new, then send every due notification this scanner claims."""
    now = now or timezone.now()
    result = ScanResult(queued=notifications_queue(now))
    due = list(
        Notification.objects.filter(
            status__in=[NotificationStatus.PENDING, NotificationStatus.SENDING],
            next_attempt_at__lte=now,
        )
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    for pk in due:
        note = _claim(pk, now)
        if note is not None:
            _deliver(note, now, result)
    return result
