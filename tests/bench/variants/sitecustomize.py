"""Loaded by every process of a benchmark run (the harness puts this directory on PYTHONPATH
when ``SIGNALBOX_BENCH_VARIANT`` is set): swaps one of Signalbox's replacements of a library
mechanism back to the library's own, so `tests/bench/mechanisms.py` can compare the two
interleaved. Never on the path outside a benchmark."""

from __future__ import annotations

import os

VARIANTS = {v for v in os.environ.get("SIGNALBOX_BENCH_VARIANT", "").split(",") if v}


def _before_django() -> None:
    if "library-publish" in VARIANTS:  # apply_async for every wake-up message
        import infra.broker

        infra.broker.TaskPublisher.usable = lambda self, task: False  # type: ignore[method-assign]


def _after_django() -> None:
    if "library-asgi" in VARIANTS:  # Django's ASGIHandler, servestatic's own middleware
        from django.core.handlers.asgi import ASGIHandler
        from servestatic.middleware import ServeStaticMiddleware

        import console.handlers
        import console.middleware

        console.handlers.OneHopASGIHandler = ASGIHandler  # type: ignore[misc]
        console.middleware.StaticFilesMiddleware = ServeStaticMiddleware  # type: ignore[misc]
    if "library-static" in VARIANTS:  # servestatic's own middleware, adapted into the sync chain
        from servestatic.middleware import ServeStaticMiddleware

        import console.middleware

        console.middleware.StaticFilesMiddleware = ServeStaticMiddleware  # type: ignore[misc]
    if "library-auth" in VARIANTS:  # the ORM's token lookup, Django's ModelBackend
        from django.contrib.auth.backends import ModelBackend

        import console.auth
        from tests.bench.variants.library_auth import authenticate

        console.auth.ApiTokenAuth.authenticate = authenticate  # type: ignore[method-assign]
        console.auth.SingleQueryModelBackend.get_all_permissions = ModelBackend.get_all_permissions  # type: ignore[method-assign]
    if "library-backend" in VARIANTS:  # Django's ModelBackend alone
        from django.contrib.auth.backends import ModelBackend

        import console.auth

        console.auth.SingleQueryModelBackend.get_all_permissions = ModelBackend.get_all_permissions  # type: ignore[method-assign]


if VARIANTS:
    _before_django()
    import django

    _setup = django.setup

    def _setup_then_swap(*args: object, **kwargs: object) -> None:
        _setup(*args, **kwargs)  # type: ignore[arg-type]
        _after_django()

    django.setup = _setup_then_swap  # type: ignore[assignment]
