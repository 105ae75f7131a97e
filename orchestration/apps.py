from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The Celery worker signals, and the tasks: registered in every process, so that the
        # outbox finds the step task by name (orchestration.dispatch) in web processes too.
        from orchestration import signals, tasks  # noqa: F401
