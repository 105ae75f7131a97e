"""The REST API root: authentication, one mapping from errors to JSON, and the apps' routers.

Every error response has the same shape, ``{"error": {"code", "message", "detail"?}}``, with a
stable ``code`` clients can branch on. Routes live under ``/api/v1/``; the OpenAPI document is
``/api/openapi.json`` and its browsable docs ``/api/docs`` (assets served locally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError, connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError

from console.auth import api_token_auth, session_auth
from orchestration.api import router as orchestration_router
from orchestration.errors import SignalboxError
from orchestration.schemas import ErrorOut

log = logging.getLogger(__name__)

api = NinjaAPI(
    title="Signalbox",
    version="1",
    description=(
        "Submit and inspect runs, decide approvals, send events. Authenticate with "
        "`Authorization: Bearer <token>` or the console's session (unsafe methods then need "
        'the CSRF token). Errors are `{"error": {"code", "message", "detail"?}}`.'
    ),
    urls_namespace="api",
    docs_url="/docs",
    openapi_url="/openapi.json",
    auth=[api_token_auth, session_auth],
)

api.add_router("/v1/", orchestration_router)


# --- errors -------------------------------------------------------------------------------------


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return {"error": error}


def error_response(
    request: HttpRequest, status: int, code: str, message: str, detail: Any = None
) -> HttpResponse:
    response = api.create_response(request, error_body(code, message, detail), status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="signalbox"'
    return response


@api.exception_handler(SignalboxError)
def _signalbox_error(request: HttpRequest, exc: SignalboxError) -> HttpResponse:
    return error_response(request, exc.http_status, exc.code, exc.message, exc.detail)


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    # Only loc/msg/type: pydantic's ctx and input can hold exceptions or echo huge payloads.
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors
    ]
    first = detail[0] if detail else None
    where = ".".join(str(part) for part in first["loc"]) if first else ""
    message = (
        f"the request is not valid: {where}: {first['msg']}"
        if first
        else "the request is not valid"
    )
    return error_response(request, 422, "invalid_request", message, detail)


@api.exception_handler(AuthenticationError)
def _authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(
        request, 401, "unauthenticated", "authenticate with a bearer token or a console session"
    )


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if exc.status_code == 400 and exc.__cause__ is not None:
        # ninja raises this when the body parser fails: the body is not JSON.
        return error_response(request, 400, "malformed_json", "the request body is not valid JSON")
    if exc.status_code == 403 and "csrf" in exc.message.lower():
        return error_response(
            request,
            403,
            "csrf_failed",
            "session-authenticated writes need the CSRF token (X-CSRFToken header)",
        )
    return error_response(request, exc.status_code, f"http_{exc.status_code}", exc.message)


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, "not_found", "no such object")


@api.exception_handler(DjangoPermissionDenied)
def _permission_denied(request: HttpRequest, exc: DjangoPermissionDenied) -> HttpResponse:
    return error_response(request, 403, "permission_denied", "you are not allowed to do this")


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(
        request,
        413,
        "payload_too_large",
        f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes",
        {"limit": settings.DATA_UPLOAD_MAX_MEMORY_SIZE},
    )


@api.exception_handler(SuspiciousOperation)
def _suspicious(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    return error_response(request, 400, "bad_request", "the request could not be processed")


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(
        request, 500, "internal_error", "something went wrong on our side; it has been logged"
    )


def api_urls() -> tuple[list[Any], str, str]:
    """``api.urls``, with ninja's plain-text 405 answers turned into the JSON error shape."""
    patterns, app_name, namespace = api.urls
    for pattern in patterns:
        # The wrapper is sync; an async operation (none yet) would keep ninja's plain 405.
        if pattern.callback is not None and not iscoroutinefunction(pattern.callback):
            pattern.callback = _json_method_not_allowed(pattern.callback)
    return patterns, app_name, namespace


def _json_method_not_allowed(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)  # keeps csrf_exempt: CSRF is enforced by the session auth, not the middleware
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = view(request, *args, **kwargs)
        if response.status_code != 405:
            return response
        allowed = response.get("Allow", "")
        json_response = error_response(
            request,
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here (allowed: {allowed})",
        )
        json_response["Allow"] = allowed
        return json_response

    return wrapper


def api_not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """Any other path under /api/: a JSON 404 rather than the site's HTML page."""
    return JsonResponse(error_body("not_found", f"no API endpoint at {request.path}"), status=404)


# --- health -------------------------------------------------------------------------------------


class HealthOut(Schema):
    status: str


@api.get(
    "/v1/health",
    auth=None,
    response={200: HealthOut, 503: ErrorOut},
    tags=["health"],
    summary="Liveness and database check (no authentication)",
)
def health(request: HttpRequest) -> Any:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError:
        log.exception("health check: database unavailable")
        return 503, error_body("database_unavailable", "the database did not answer")
    return {"status": "ok"}
