"""``python manage.py demo`` (``make demo``): everything in one process, no services needed.

Migrates the SQLite file under ``var/``, creates the demo users once, then serves the console
with a Celery worker, the scheduler and a simulator of demo traffic in the same process.
Ctrl-C stops it; starting again keeps the data.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from console.demo import (
    DEMO_USERS,
    SIMULATOR_USER,
    DemoSeed,
    DemoSimulator,
    demo_policy_install,
    demo_users_seed,
)
from console.embedded import EmbeddedOptions, EmbeddedStack, bind_socket
from orchestration.registry import pools


class Command(BaseCommand):
    help = "Run Signalbox in embedded mode: web console, worker, scheduler and demo traffic in one process."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
        )
        parser.add_argument(
            "--port", type=int, default=8000, help="port to listen on (default 8000)"
        )
        parser.add_argument("--concurrency", type=int, default=4, help="worker threads (default 4)")
        parser.add_argument(
            "--no-simulator", action="store_true", help="do not submit simulated demo work"
        )
        parser.add_argument(
            "--auto-decide",
            action="store_true",
            help="let the simulator answer approvals and escalations left for 2 minutes (default: "
            "they wait for a person)",
        )
        parser.add_argument(
            "--allow-external",
            action="store_true",
            help="run even though DATABASE_URL or REDIS_URL is set (uses those services)",
        )

    _auto_decide = False

    def handle(self, *args: Any, **options: Any) -> None:
        self._auto_decide = bool(options["auto_decide"])
        consequences = {
            "DATABASE_URL": "its data would go to that database",
            "REDIS_URL": "its worker would take tasks from that broker",
        }
        external = [name for name in consequences if os.environ.get(name)]
        if external and not options["allow_external"]:
            raise CommandError(
                f"{' and '.join(external)} {'is' if len(external) == 1 else 'are'} set, so this would "
                f"not be the embedded demo: {' and '.join(consequences[n] for n in external)}. Unset "
                f"{'it' if len(external) == 1 else 'them'}, or pass --allow-external if that is what you want."
            )
        try:
            sock = bind_socket(options["host"], options["port"])
        except OSError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{options['port']} ({exc.strerror}); pass --port"
            ) from None

        call_command("migrate", interactive=False, verbosity=0)
        where = (
            settings.DATABASES["default"]["NAME"]
            if settings.EMBEDDED
            else "PostgreSQL (DATABASE_URL)"
        )
        self.stdout.write(f"Database {where}: migrated.")
        self._report_seed(demo_users_seed())
        installed = demo_policy_install()
        if installed.created:
            self.stdout.write(
                f"Demo policy installed as version {installed.version.number} (refund tiers, email allowlist, "
                "customer hours, daily ceilings). As admin, open /policies/ to simulate a new draft against "
                "recent work and submit it; admin2 approves and activates it."
            )

        simulator = None
        if not options["no_simulator"]:
            service = get_user_model().objects.filter(username=SIMULATOR_USER).first()
            if service is None:
                self.stdout.write(
                    f"No service account {SIMULATOR_USER!r} to submit demo work as: simulator off."
                )
            else:
                simulator = DemoSimulator(user=service, auto_decide=options["auto_decide"]).tick
        stack = EmbeddedStack(
            EmbeddedOptions(
                host=options["host"],
                port=options["port"],
                concurrency=options["concurrency"],
                simulator=simulator,
            ),
            pools(),
            on_ready=self._report_ready,
            say=self._say,
        )
        stack.run(sock)
        self._say("Stopped. Start again with `python manage.py demo`; the data is kept.")
        if not stack.clean_stop:
            # Worker threads still inside an agent call would hold the interpreter open until they
            # finish; their steps are leased and rerun at the next start, so leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def _say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _report_seed(self, seed: DemoSeed) -> None:
        if seed.created:
            lines = [
                "Demo users created. Their passwords are shown now and never again:",
                "",
                *(f"  {name:<10} {password}" for name, password in seed.created.items()),
                "",
                "Roles: trainee decides approvals up to tier 1, operator up to tier 2, lead and",
                "lead2 up to tier 3 (refunds above 10,000 need both); admin and admin2 edit",
                "policies (each approves the other's); auditor reads everything.",
                "Reset a password any time: python manage.py changepassword operator",
            ]
            width = max(len(line) for line in lines) + 2
            border = "+" + "-" * (width + 2) + "+"
            box = [border, *(f"| {line:<{width}} |" for line in lines), border]
            self.stdout.write("\n".join(["", *box, ""]))
        if seed.existing:
            self.stdout.write(
                f"Demo users {', '.join(seed.existing)} already exist (their passwords were shown when they "
                "were created). Forgot one? python manage.py changepassword operator"
            )

    def _report_ready(self, stack: EmbeddedStack) -> None:
        host = stack.options.host
        shown_host = f"[{host}]" if ":" in host else host
        worker = stack.worker
        lines = [
            "",
            f"Signalbox is running at http://{shown_host}:{stack.options.port}/  "
            f"(log in as {', '.join(DEMO_USERS)})",
            "  web        ASGI server (uvicorn) with websockets for live updates",
            f"  worker     Celery, {worker.concurrency if worker else '?'} threads, pools: {', '.join(stack.pools)}",
            f"  scheduler  engine tick every {stack.options.tick_seconds:g}s (expired leases, timeouts, deadlines)",
            *(
                [
                    "  simulator  submits work as its own service account: first one of each kind of item",
                    "             (approvals at tiers 1-3, escalations, a payment it settles later), then a few a",
                    "             minute; approvals and escalations wait for you"
                    + (" (--auto-decide: answered after 2 minutes)" if self._auto_decide else ""),
                ]
                if stack.options.simulator
                else ["  simulator  off (--no-simulator)"]
            ),
            *(
                [
                    f"  mail       items at tier {settings.SIGNALBOX_NOTIFY_MIN_TIER} and above notify the people who "
                    "may decide them, by email written",
                    f"             as files to {settings.EMAIL_FILE_PATH}",
                ]
                if settings.EMAIL_BACKEND.endswith("filebased.EmailBackend")
                else []
            ),
            "Press Ctrl-C to stop.",
        ]
        self._say("\n".join(lines))
