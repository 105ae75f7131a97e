"""The worker side of the engine: claim a step, run its agent outside any transaction, commit
the outcome and advance the run, then run what this worker claimed for itself.

``execute.step_execute`` is the entry point (a Celery task calls it with the process's
runtime). The path of one step, top to bottom: ``execute`` (the loop of a worker's chain of
steps) → ``attempt`` (the agent, its input and output contracts) → ``complete`` (load,
``orchestration.advance``, write, send) → ``chain`` (commits in flight and what they
confirm). No module here calls back into one above it.
"""
