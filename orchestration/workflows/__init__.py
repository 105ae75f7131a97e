"""Built-in workflow definitions, registered in ``orchestration.registry.BUILTIN_WORKFLOWS``."""
