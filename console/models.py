"""API tokens for programmatic clients. Only a digest of each token is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.conf import settings
from django.db import models
from django.utils import timezone


def token_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token: ``Authorization: Bearer sbx_...``. The raw value is shown once."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    digest = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    #: After this the token is refused (None: it does not expire).
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(
        cls, user: models.Model, name: str, expires_at: datetime | None = None
    ) -> tuple[ApiToken, str]:
        """Create a token and return it with its raw value (never stored)."""
        raw = "sbx_" + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, name=name, digest=token_digest(raw), prefix=raw[:8], expires_at=expires_at
        )
        return token, raw

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class UserProfile(models.Model):
    """A user's own settings, created the first time they are needed."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile"
    )
    #: An IANA zone name (``Europe/Berlin``); times on pages are shown in it.
    time_zone = models.CharField(max_length=64, default="UTC")

    def __str__(self) -> str:
        return f"{self.user} ({self.time_zone})"


class NotificationChannel(models.TextChoices):
    EMAIL = "email"
    WEBHOOK = "webhook"


class NotificationStatus(models.TextChoices):
    PENDING = "pending"  # due at ``next_attempt_at`` (a first try or a retry)
    SENDING = "sending"  # claimed by a scanner until ``next_attempt_at``; taken over after that
    SENT = "sent"
    FAILED = "failed"  # every attempt failed


class Notification(models.Model):
    """One alert about an open approval or escalation on one channel. The unique (wait, channel,
    reason) row is the claim: a wait is notified once per tier it reaches, however many
    scanners run."""

    wait = models.ForeignKey("orchestration.Wait", on_delete=models.CASCADE, related_name="+")
    channel = models.CharField(max_length=10, choices=NotificationChannel.choices)
    #: ``tier-2``: the item reached tier 2 (opened there, or escalated to it by an SLA breach).
    reason = models.CharField(max_length=40)
    status = models.CharField(
        max_length=10, choices=NotificationStatus.choices, default=NotificationStatus.PENDING
    )
    attempts = models.SmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["wait", "channel", "reason"], name="notification_once"),
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status__in=["pending", "sending"]),
                name="notification_due_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} notification for wait {self.wait_id} ({self.status})"


class SavedViewPage(models.TextChoices):
    HOME = "home"
    RUNS = "runs", "run list"
    INBOX = "inbox"


class SavedView(models.Model):
    """A user's named filters of a list page (home, the run list, the inbox), opened as a link
    that reproduces them. Saving a name again replaces it."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="saved_views"
    )
    page = models.CharField(max_length=10, choices=SavedViewPage.choices)
    name = models.CharField(max_length=100)
    #: The page's filters as a query string (``status=failed&tier=2``), known keys only.
    query = models.CharField(max_length=1000, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "page", "name"], name="saved_view_name_once"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.page}, {self.user})"
