from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The Celery worker signals, and the tasks: registered in every process, so that the
        # outbox finds the step task by name (orchestration.dispatch) in web processes too.
        from orchestration import ledger_calls, signals, tasks  # noqa: F401

        # The ledger (below the engine) finds the calls recorded on step rows through this.
        ledger_calls.register()
