"""``manage.py drill --tier 2 [--tenant acme] [--note text] [--user admin]``: fire an escalation
drill through the real engine (the same as the Drills page)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from orchestration.errors import SignalboxError
from orchestration.services import drill_fire


class Command(BaseCommand):
    help = "Fire an escalation drill: a synthetic escalation at a tier, visible as DRILL, notified as usual."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tier", type=int, default=1, choices=[1, 2, 3])
        parser.add_argument(
            "--tenant", default="", help="tenant slug (default: the default tenant)"
        )
        parser.add_argument("--note", default="")
        parser.add_argument(
            "--user", default="", help="fire as this policy admin (default: the system)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user = None
        if options["user"]:
            user = get_user_model().objects.filter(username=options["user"]).first()
            if user is None:
                raise CommandError(f"no user {options['user']!r}")
        try:
            run = drill_fire(
                user=user, tier=options["tier"], tenant=options["tenant"], note=options["note"]
            )
        except SignalboxError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"Drill fired: run {run.pk} escalates at tier {options['tier']}.")
