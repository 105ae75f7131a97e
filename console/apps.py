from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Signalbox console"

    def ready(self) -> None:
        # Receivers of login signals: failed logins and lockouts are audited; logouts close
        # that session's websockets in every tab.
        from console import accounts, live_auth  # noqa: F401
