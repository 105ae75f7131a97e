"""Error codes of the REST API's own refusals: those that arise before (or around) the engine,
from parsing, authentication, routing and the server itself. The engine's codes are
``orchestration.errors.Code``. Stable, like those: clients branch on them; never rename one."""

from __future__ import annotations

from enum import StrEnum


class ApiCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    """A parameter or the body does not satisfy the operation's schema (422)."""
    MALFORMED_JSON = "malformed_json"
    """The body is not JSON (400)."""
    UNAUTHENTICATED = "unauthenticated"
    """No valid bearer token or console session (401)."""
    TOKEN_EXPIRED = "token_expired"
    """The bearer token is past its expiry; make a new one (401)."""
    TOKEN_REVOKED = "token_revoked"
    """The bearer token was revoked (401)."""
    LOCKED_OUT = "locked_out"
    """Too many failed logins for this user from this address; wait and try again (429)."""
    CSRF_FAILED = "csrf_failed"
    """A session-authenticated write without the CSRF token (403)."""
    PERMISSION_DENIED = "permission_denied"
    """Refused by Django's own permission checks (403)."""
    NOT_FOUND = "not_found"
    """No such endpoint (404)."""
    METHOD_NOT_ALLOWED = "method_not_allowed"
    """The path exists, the method does not (405)."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    """The body is over the upload limit (413)."""
    BAD_REQUEST = "bad_request"
    """Django refused the request as suspicious, e.g. too many fields (400)."""
    INTERNAL_ERROR = "internal_error"
    """A bug on the server's side; logged (500)."""
    DATABASE_UNAVAILABLE = "database_unavailable"
    """The health check could not reach the database (503)."""
