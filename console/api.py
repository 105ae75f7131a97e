"""The REST API root: authentication, the one mapping from errors to HTTP, and the routers.

Every error response has the same shape, ``{"error": {"code", "message", "detail"?}}``, with a
stable ``code`` clients can branch on: the engine's (``orchestration.errors.Code``) or the API's
own (``console.errors.ApiCode``). Which HTTP status an engine error gets is decided here and
nowhere else (``ERROR_STATUS``). Routes live under ``/api/v1/``; the OpenAPI document is
``/api/openapi.json`` and its browsable docs ``/api/docs`` (assets served locally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from copy import deepcopy
from functools import wraps
from inspect import iscoroutinefunction
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError, connection
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError, ValidationError

from console.auth import api_token_auth, session_auth
from console.errors import ApiCode
from orchestration.api import router as orchestration_router
from orchestration.contracts import validation_errors
from orchestration.errors import (
    Code,
    Conflict,
    ContractViolation,
    InvalidInput,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SignalboxError,
)
from orchestration.schemas import ErrorOut
from orchestration.selectors import run_get_for_decision
from policies.api import router as policies_router
from policies.errors import (
    CeilingExceeded,
    PolicyConflict,
    PolicyDenied,
    PolicyError,
    PolicyInvalidQuery,
    PolicyNotFound,
)
from policies.errors import Code as PolicyCode
from policies.source import PolicySourceError
from policies.spend_api import spend_router

log = logging.getLogger(__name__)

#: The HTTP status of each engine error class. A class not listed takes its nearest listed
#: ancestor's (along its MRO): ``UnknownWorkflow`` is a ``NotFound``, so 404.
ERROR_STATUS: dict[type[SignalboxError], int] = {
    SignalboxError: 400,
    ContractViolation: 422,
    LimitExceeded: 409,
    NotFound: 404,
    PermissionDenied: 403,
    Conflict: 409,
    InvalidInput: 422,
    PayloadTooLarge: 413,
}


def error_status(exc: SignalboxError) -> int:
    """The HTTP status for ``exc``: its class's in ``ERROR_STATUS``, or its nearest ancestor's."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    raise TypeError(f"{type(exc).__name__} is not a SignalboxError")  # pragma: no cover


#: Validation error types that are stable codes in their own right: when every refusal of a
#: request has the same one, it is the response's code (otherwise ``invalid_request``).
STABLE_VALIDATION_CODES = frozenset(Code)

ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}

#: What each error status means, in the document; ninja would only say "Bad Request" etc.
ERROR_DESCRIPTIONS = {
    400: "The body is not JSON (`malformed_json`).",
    401: (
        "No valid bearer token or console session (`unauthenticated`; `token_expired` or "
        "`token_revoked` for a token past its expiry or revoked)."
    ),
    403: (
        "Authenticated, but not allowed to do this (`submit_denied`, `decide_denied`, "
        "`view_denied`; `csrf_failed` for a session write without the CSRF token)."
    ),
    404: "No such object, or one you may not see (`run_not_found`, `unknown_workflow`, ...).",
    409: "The object's state does not allow this now (`already_decided`, `run_terminal`, ...).",
    413: "The body, or a payload in it, is over its size limit (`payload_too_large`).",
    422: (
        "Parameters or body refused: `invalid_request` (see `detail`, one entry per refusal "
        "with its `loc`); `unstorable_value` for what the database cannot store (NUL, lone "
        "surrogates, NaN/Infinity, offsets beyond ±15:59); the cross-field rules' own codes "
        "(`reason_required`, `edited_input_missing`, `output_missing`, ...); a contract's "
        "(`input_contract`, `output_contract`)."
    ),
}


class SignalboxAPI(NinjaAPI):
    def get_openapi_schema(self, **kwargs: Any) -> Any:
        """ninja's document, plus the 400 every operation with a body can answer (the body is
        parsed before any handler runs, so no handler can declare it) and what each error
        status means."""
        schema = super().get_openapi_schema(**kwargs)
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation["responses"]
                if "requestBody" in operation:
                    responses.setdefault("400", {"content": deepcopy(ERROR_REF)})
                for status, response in responses.items():
                    if response.get("content") == ERROR_REF and int(status) in ERROR_DESCRIPTIONS:
                        response["description"] = ERROR_DESCRIPTIONS[int(status)]
        return schema


api = SignalboxAPI(
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
api.add_router("/v1/policies/", policies_router)
# Raising a run's ceiling answers its escalation: the same people may do it, on the run's tenant.
api.add_router("/v1/spend/", spend_router(ErrorOut, run_get_for_decision))


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
    return error_response(request, error_status(exc), exc.code, exc.message, exc.detail)


@api.exception_handler(ValidationError)
def _validation_error(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    detail = [
        {**error, "loc": _client_loc(error["loc"])} for error in validation_errors(exc.errors)
    ]
    kinds = {error["type"] for error in detail}
    code = kinds.pop() if len(kinds) == 1 and kinds <= STABLE_VALIDATION_CODES else None
    first = detail[0] if detail else None
    if first is None:
        message = "the request is not valid"
    else:
        where = ".".join(str(part) for part in first["loc"])
        message = (
            f"{where}: {first['msg']}"
            if code
            else f"the request is not valid: {where}: {first['msg']}"
        )
    return error_response(request, 422, code or ApiCode.INVALID_REQUEST, message, detail)


def _client_loc(loc: list[Any]) -> list[Any]:
    """Where the client put the value: ninja names a body field after the handler's parameter
    (``body.payload.reason``), which the client never sees; drop it (``body.reason``)."""
    return [loc[0], *loc[2:]] if len(loc) >= 2 and loc[0] == "body" else loc


@api.exception_handler(AuthenticationError)
def _authentication_error(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    refusal = getattr(request, "sbx_auth_refusal", None)  # set by console.auth.ApiTokenAuth
    if refusal is not None:
        return error_response(request, 401, refusal, TOKEN_REFUSALS[refusal])
    return error_response(
        request,
        401,
        ApiCode.UNAUTHENTICATED,
        "authenticate with a bearer token or a console session",
    )


#: Why a bearer token that exists was refused.
TOKEN_REFUSALS = {
    ApiCode.TOKEN_EXPIRED: "this API token has expired; make a new one on your account's tokens page",
    ApiCode.TOKEN_REVOKED: "this API token was revoked; make a new one on your account's tokens page",
}


#: Codes for ninja's own HttpErrors that have no more specific meaning below.
HTTP_ERROR_CODES = {
    400: ApiCode.BAD_REQUEST,
    401: ApiCode.UNAUTHENTICATED,
    403: ApiCode.PERMISSION_DENIED,
    404: ApiCode.NOT_FOUND,
    405: ApiCode.METHOD_NOT_ALLOWED,
    413: ApiCode.PAYLOAD_TOO_LARGE,
}


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    if exc.status_code == 400 and exc.__cause__ is not None:
        # ninja raises this when the body parser fails: the body is not JSON.
        return error_response(
            request, 400, ApiCode.MALFORMED_JSON, "the request body is not valid JSON"
        )
    if exc.status_code == 403 and "csrf" in exc.message.lower():
        return error_response(
            request,
            403,
            ApiCode.CSRF_FAILED,
            "session-authenticated writes need the CSRF token (X-CSRFToken header)",
        )
    fallback = ApiCode.INTERNAL_ERROR if exc.status_code >= 500 else ApiCode.BAD_REQUEST
    code = HTTP_ERROR_CODES.get(exc.status_code, fallback)
    return error_response(request, exc.status_code, code, exc.message)


@api.exception_handler(Http404)
def _not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return error_response(request, 404, ApiCode.NOT_FOUND, "no such object")


@api.exception_handler(DjangoPermissionDenied)
def _permission_denied(request: HttpRequest, exc: DjangoPermissionDenied) -> HttpResponse:
    return error_response(request, 403, ApiCode.PERMISSION_DENIED, "you are not allowed to do this")


@api.exception_handler(RequestDataTooBig)
def _too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(
        request,
        413,
        ApiCode.PAYLOAD_TOO_LARGE,
        f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes",
        {"limit": settings.DATA_UPLOAD_MAX_MEMORY_SIZE},
    )


@api.exception_handler(SuspiciousOperation)
def _suspicious(request: HttpRequest, exc: SuspiciousOperation) -> HttpResponse:
    return error_response(request, 400, ApiCode.BAD_REQUEST, "the request could not be processed")


@api.exception_handler(Exception)
def _unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    log.exception("unhandled error in %s %s", request.method, request.path)
    return error_response(
        request,
        500,
        ApiCode.INTERNAL_ERROR,
        "something went wrong on our side; it has been logged",
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
            ApiCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed here (allowed: {allowed})",
        )
        json_response["Allow"] = allowed
        return json_response

    return wrapper


def api_not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """Any other path under /api/: a JSON 404 rather than the site's HTML page."""
    return JsonResponse(
        error_body(ApiCode.NOT_FOUND, f"no API endpoint at {request.path}"), status=404
    )


def _is_api(request: HttpRequest) -> bool:
    return request.path_info.startswith("/api/")


# Refusals made before a request reaches the API's view (Django's middleware: a Host header
# that is not allowed, a permission check, a crash) get the JSON shape under /api/ as well;
# Django's own pages elsewhere. Installed as the project's handler400/403/500.


def bad_request_page(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_body(ApiCode.BAD_REQUEST, "the request could not be processed"), status=400
        )
    return defaults.bad_request(request, exception)


def permission_denied_page(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_body(ApiCode.PERMISSION_DENIED, "you are not allowed to do this"), status=403
        )
    return defaults.permission_denied(request, exception)


def server_error_page(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_body(
                ApiCode.INTERNAL_ERROR, "something went wrong on our side; it has been logged"
            ),
            status=500,
        )
    return defaults.server_error(request)


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
        return 503, error_body(ApiCode.DATABASE_UNAVAILABLE, "the database did not answer")
    return {"status": "ok"}


# --- policy errors ------------------------------------------------------------------------------

#: The HTTP status of each policies error class (nearest listed ancestor wins, as above).
POLICY_ERROR_STATUS: dict[type[PolicyError], int] = {
    PolicyError: 400,
    PolicyNotFound: 404,
    PolicyDenied: 403,
    PolicyConflict: 409,
    PolicyInvalidQuery: 422,
    CeilingExceeded: 409,
}
#: Codes whose status is not their class's: a missing reason is a refused body, not a state.
POLICY_CODE_STATUS = {
    PolicyCode.REASON_REQUIRED: 422,
    PolicyCode.CEILING_TIER_REQUIRED: 403,
    PolicyCode.SPEND_NOT_VISIBLE: 403,
    PolicyCode.FOUR_EYES: 403,
    PolicyCode.INVALID_SCOPE: 404,
    PolicyCode.RESERVATION_NOT_FOUND: 404,
    PolicyCode.VERSION_NOT_FOUND: 404,
    PolicyCode.CEILING_NOT_RAISED: 409,
    PolicyCode.RESERVATION_SETTLED: 409,
    PolicyCode.RESERVATION_RELEASED: 409,
    PolicyCode.INVALID_AMOUNT: 422,
    PolicyCode.INVALID_RESERVATION: 422,
}


def policy_error_status(exc: PolicyError) -> int:
    """The HTTP status for a policies error: by its code where listed, else by its class."""
    if exc.code in POLICY_CODE_STATUS:
        return POLICY_CODE_STATUS[PolicyCode(exc.code)]
    for cls in type(exc).__mro__:
        if cls in POLICY_ERROR_STATUS:
            return POLICY_ERROR_STATUS[cls]
    raise TypeError(f"{type(exc).__name__} is not a PolicyError")  # pragma: no cover


@api.exception_handler(PolicyError)
def _policy_error(request: HttpRequest, exc: PolicyError) -> HttpResponse:
    return error_response(request, policy_error_status(exc), exc.code, exc.message, exc.detail)


@api.exception_handler(PolicySourceError)
def _policy_source_error(request: HttpRequest, exc: PolicySourceError) -> HttpResponse:
    problems = [problem.to_json() for problem in exc.problems]
    message = f"the policy has {len(problems)} problem(s): {exc.problems[0]}"
    return error_response(request, 422, PolicySourceError.code, message, problems)
