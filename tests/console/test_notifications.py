"""Alerts for items at or above the notify tier: one email (through a local SMTP server) and one
Slack-style webhook (to a local HTTP server) with the deep link; retried with backoff, then
audited as failed; never sent twice, however many scanners run."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from audit.models import AuditEvent
from audit.verbs import Verb
from console.models import Notification, NotificationStatus
from console.notifications import notifications_scan
from orchestration.models import Wait, WaitKind, WaitStatus
from orchestration.services import drill_fire, run_submit, waits_escalate_breached
from tests.factories import UserFactory
from tests.support.alert_servers import smtp_server, webhook_server

DECIDER = [
    "orchestration.decide_run",
    "orchestration.decide_workflow",
    "orchestration.decide_tier_1",
    "orchestration.decide_tier_2",
    "policies.decide_runs",
]


@pytest.fixture
def alerts(settings):
    with smtp_server() as mailbox, webhook_server() as hook:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
        settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", mailbox.port
        settings.SIGNALBOX_NOTIFY_WEBHOOK_URL = hook.url
        settings.SIGNALBOX_BASE_URL = "https://signalbox.example"
        settings.SIGNALBOX_NOTIFY_MIN_TIER = 2
        settings.SIGNALBOX_NOTIFY_BACKOFF_SECONDS = 10
        settings.SIGNALBOX_NOTIFY_MAX_ATTEMPTS = 3
        yield mailbox, hook


def open_escalation(drive, tier: int = 1) -> Wait:
    run = drive(run_submit(workflow="escalating", input={"permanent": True}).run.pk)
    wait = Wait.objects.get(run=run, kind=WaitKind.ESCALATION, status=WaitStatus.OPEN)
    if tier != wait.tier:
        Wait.objects.filter(pk=wait.pk).update(tier=tier)
        wait.refresh_from_db()
    return wait


@pytest.mark.django_db
def test_a_tier_2_item_sends_one_email_and_one_webhook_with_the_deep_link(drive, alerts):
    mailbox, hook = alerts
    UserFactory(username="lead", email="lead@example.com", permissions=DECIDER)
    UserFactory(
        username="junior",
        email="junior@example.com",
        permissions=[p for p in DECIDER if p != "orchestration.decide_tier_2"],
    )
    wait = open_escalation(drive, tier=2)

    result = notifications_scan()
    assert (result.queued, result.sent) == (2, 2)
    link = f"https://signalbox.example/inbox/{wait.pk}/"
    assert len(mailbox.mails) == 1
    mail = mailbox.mails[0]
    assert mail.recipients == ["lead@example.com"]  # only who may decide tier 2
    assert "needs a decision" in mail.message["Subject"]
    assert link in mail.message.get_payload()
    assert len(hook.posts) == 1
    assert link in hook.posts[0]["text"]
    assert hook.posts[0]["blocks"][1]["elements"][0]["url"] == link
    assert AuditEvent.objects.filter(verb=Verb.NOTIFICATION_SENT, run_id=wait.run_id).count() == 2

    notifications_scan()  # again: nothing new
    assert (len(mailbox.mails), len(hook.posts)) == (1, 1)


@pytest.mark.django_db
def test_a_tier_1_item_sends_nothing_until_its_sla_breach_escalates_it(drive, alerts, settings):
    mailbox, hook = alerts
    settings.SIGNALBOX_NOTIFY_EMAILS = ["oncall@example.com"]
    wait = open_escalation(drive, tier=1)
    assert notifications_scan().queued == 0
    assert (mailbox.mails, hook.posts) == ([], [])

    waits_escalate_breached(timezone.now() + timedelta(days=1))
    notifications_scan()
    assert len(mailbox.mails) == 1
    assert mailbox.mails[0].recipients == ["oncall@example.com"]
    assert "SLA breached 1x, now tier 2" in hook.posts[0]["text"]
    assert Wait.objects.get(pk=wait.pk).tier == 2


@pytest.mark.django_db
def test_a_failing_webhook_is_retried_with_backoff_then_audited_as_failed(drive, settings):
    settings.SIGNALBOX_NOTIFY_MIN_TIER = 2
    settings.SIGNALBOX_NOTIFY_EMAILS = ["oncall@example.com"]
    settings.SIGNALBOX_NOTIFY_BACKOFF_SECONDS = 10
    settings.SIGNALBOX_NOTIFY_MAX_ATTEMPTS = 3
    with webhook_server(fail_first=99) as hook:
        settings.SIGNALBOX_NOTIFY_WEBHOOK_URL = hook.url
        wait = open_escalation(drive, tier=2)
        now = timezone.now()
        notifications_scan(now)
        note = Notification.objects.get(wait=wait, channel="webhook")
        assert (note.status, note.attempts) == (NotificationStatus.PENDING, 1)
        assert note.next_attempt_at == now + timedelta(seconds=10)
        assert "500" in note.last_error

        notifications_scan(now + timedelta(seconds=5))  # not due yet
        assert hook.answered_500 == 1
        notifications_scan(now + timedelta(seconds=10))
        note.refresh_from_db()
        assert note.attempts == 2
        assert note.next_attempt_at == now + timedelta(seconds=30)  # twice as long
        assert not AuditEvent.objects.filter(verb=Verb.NOTIFICATION_FAILED).exists()
        notifications_scan(now + timedelta(seconds=30))
        note.refresh_from_db()
        assert (note.status, note.attempts, hook.answered_500) == (NotificationStatus.FAILED, 3, 3)
        failed = AuditEvent.objects.get(verb=Verb.NOTIFICATION_FAILED)
        assert failed.data["channel"] == "webhook" and failed.data["attempts"] == 3
        notifications_scan(now + timedelta(hours=1))
        assert hook.answered_500 == 3  # given up


@pytest.mark.django_db(transaction=True)
def test_two_scanners_at_once_notify_once(drive, alerts, settings):
    mailbox, hook = alerts
    settings.SIGNALBOX_NOTIFY_EMAILS = ["oncall@example.com"]
    for _ in range(3):
        open_escalation(drive, tier=2)
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def scanner() -> None:
        try:
            start.wait()
            notifications_scan()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=scanner) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert (len(mailbox.mails), len(hook.posts)) == (3, 3)
    assert AuditEvent.objects.filter(verb=Verb.NOTIFICATION_SENT).count() == 6


@pytest.mark.django_db
def test_a_drill_is_notified_as_a_drill(drive, alerts, settings):
    mailbox, hook = alerts
    settings.SIGNALBOX_NOTIFY_EMAILS = ["oncall@example.com"]
    run = drive(drill_fire(user=None, tier=2).pk)
    notifications_scan()
    assert (
        mailbox.mails[0]
        .message["Subject"]
        .startswith("[DRILL] Escalation needs a decision: drill run")
    )
    assert hook.posts[0]["text"].startswith(
        f"[DRILL] Escalation needs a decision: drill run {run.pk}"
    )
