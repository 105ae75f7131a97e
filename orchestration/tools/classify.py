"""What a provider failure means: retry it, try the next provider, or stop.

Classification is an explicit, ordered list of functions ``exception -> Failure | None``; the
first that answers wins. A deployment adds its own with :func:`classifier_register` (an SDK's
exception types, a provider's error bodies), and a provider may answer first for its own errors
(``Provider.classify_failure``).

The defaults: timeouts, connection errors, 429 and 5xx are transient (retried with backoff, then
the next provider). A request the provider refused (other 4xx) is permanent and stops the whole
call, since another provider would refuse it too. Failures that belong to one provider rather
than to the request (its credentials were refused, its reply broke the result contract) are not
retried on that provider, but the next provider may serve the call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import httpx

from orchestration.errors import Code, ErrorClass, SignalboxError
from orchestration.tools.providers import (
    Failure,
    ProviderHTTPError,
    ProviderNotConfigured,
    ProviderResultInvalid,
)

if TYPE_CHECKING:
    from orchestration.tools.providers import Provider


def transient(code: str, message: str, **extra: Any) -> Failure:
    """May succeed if tried again: retried with backoff, then the next provider."""
    return Failure(
        ErrorClass.TRANSIENT,
        code,
        message,
        retry=True,
        next_provider=True,
        provider_fault=True,
        **extra,
    )


def permanent(code: str, message: str, **extra: Any) -> Failure:
    """The request itself is wrong: no retry, no other provider."""
    return Failure(
        ErrorClass.PERMANENT,
        code,
        message,
        retry=False,
        next_provider=False,
        provider_fault=False,
        **extra,
    )


def provider_unusable(
    code: str, message: str, error_class: ErrorClass = ErrorClass.PERMANENT, **extra: Any
) -> Failure:
    """This provider cannot serve the call (refused credentials, broken reply); another may."""
    return Failure(
        error_class, code, message, retry=False, next_provider=True, provider_fault=True, **extra
    )


Classifier = Callable[[BaseException], Failure | None]


def _signalbox_errors(exc: BaseException) -> Failure | None:
    # Providers written in Python may raise the engine's own errors; their class decides.
    if not isinstance(exc, SignalboxError):
        return None
    if exc.error_class == ErrorClass.TRANSIENT:
        return transient(exc.code, exc.message)
    if exc.error_class == ErrorClass.CONTRACT:
        return provider_unusable(exc.code, exc.message, ErrorClass.CONTRACT)
    return replace(permanent(exc.code, exc.message), error_class=exc.error_class)


def _http_statuses(exc: BaseException) -> Failure | None:
    if not isinstance(exc, ProviderHTTPError):
        return None
    status = exc.status
    detail = {"status": status, "body": exc.body}
    message = f"provider answered {status}"
    if status == 408:
        return transient(Code.PROVIDER_TIMEOUT, message, detail=detail)
    if status == 429:
        return transient(
            Code.PROVIDER_THROTTLED, message, retry_after=exc.retry_after, detail=detail
        )
    if status >= 500:
        return transient(Code.PROVIDER_ERROR, message, retry_after=exc.retry_after, detail=detail)
    if status in (401, 403):
        return provider_unusable(Code.PROVIDER_PERMISSION_DENIED, message, detail=detail)
    return permanent(Code.PROVIDER_REJECTED, message, detail=detail)


def _timeouts(exc: BaseException) -> Failure | None:
    # TimeoutError is also socket.timeout; httpx has its own hierarchy.
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return transient(
            Code.PROVIDER_TIMEOUT, f"provider did not answer in time: {_describe(exc)}"
        )
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _permissions(exc: BaseException) -> Failure | None:
    # Before connection errors: PermissionError is an OSError too.
    if isinstance(exc, PermissionError):
        return provider_unusable(Code.PERMISSION_DENIED, f"permission denied: {_describe(exc)}")
    return None


def _connections(exc: BaseException) -> Failure | None:
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return transient(Code.CONNECTION_ERROR, f"could not reach the provider: {_describe(exc)}")
    return None


def _provider_setup(exc: BaseException) -> Failure | None:
    if isinstance(exc, ProviderResultInvalid):
        return provider_unusable(Code.RESULT_CONTRACT, str(exc), ErrorClass.CONTRACT)
    if isinstance(exc, ProviderNotConfigured):
        # Not the service's health: the circuit stays as it is.
        return replace(
            provider_unusable(Code.PROVIDER_NOT_CONFIGURED, str(exc)), provider_fault=False
        )
    return None


#: Tried in order; the first answer wins. Extended with :func:`classifier_register`.
CLASSIFIERS: list[Classifier] = [
    _signalbox_errors,
    _http_statuses,
    _timeouts,
    _permissions,
    _connections,
    _provider_setup,
]


def classifier_register(classifier: Classifier, *, first: bool = True) -> None:
    """Add a classifier; ``first`` puts it ahead of the built-in ones (to override them)."""
    if classifier in CLASSIFIERS:
        return
    if first:
        CLASSIFIERS.insert(0, classifier)
    else:
        CLASSIFIERS.append(classifier)


def failure_classify(exc: BaseException, provider: Provider | None = None) -> Failure:
    """Classify what a provider raised. Unknown exceptions are transient (bounded by attempts)."""
    if provider is not None:
        own = provider.classify_failure(exc)
        if own is not None:
            return own
    for classifier in CLASSIFIERS:
        found = classifier(exc)
        if found is not None:
            return found
    return transient(Code.PROVIDER_EXCEPTION, f"{type(exc).__name__}: {exc}")
