from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Signalbox console"

    def ready(self) -> None:
        # Receivers of login signals: failed logins and lockouts are audited.
        from console import accounts  # noqa: F401
