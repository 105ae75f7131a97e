"""``python manage.py service_account <name> [--tenant slug ...] [--token-name ...] [--expires-days N]``

Creates (or updates) a user that submits work for the given tenants and prints a new API token
for it, once: store it in the client's secrets straight away.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from console.accounts import DEFAULT_EXPIRY_DAYS, AccountError, service_account_ensure
from policies.tenants import UnknownTenant


class Command(BaseCommand):
    help = "Create or update a service account that submits runs, and print a new API token for it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the account's username")
        parser.add_argument(
            "--tenant",
            action="append",
            default=[],
            help="a tenant it submits for (repeatable; default tenant if none)",
        )
        parser.add_argument(
            "--token-name", default="", help="a name for the token (default: the account's name)"
        )
        parser.add_argument(
            "--expires-days",
            type=int,
            default=DEFAULT_EXPIRY_DAYS,
            help=f"days until the token expires, 0 for never (default {DEFAULT_EXPIRY_DAYS})",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user, token, raw = service_account_ensure(
                options["name"],
                tenants=options["tenant"],
                token_name=options["token_name"] or options["name"],
                expires_days=options["expires_days"] or None,
            )
        except (AccountError, UnknownTenant) as exc:
            raise CommandError(str(exc)) from exc
        expires = token.expires_at.date().isoformat() if token.expires_at else "never"
        self.stderr.write(
            f"Token {token.name!r} for {user.username} (expires {expires}); shown only now:"
        )
        self.stdout.write(raw)
