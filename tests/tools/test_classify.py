"""Failure classification: explicit defaults, extensible, and a provider's own view first."""

from __future__ import annotations

import httpx
import pytest

from orchestration.errors import ContractViolation, ErrorClass, PermanentError, TransientError
from orchestration.tools import classify
from orchestration.tools.classify import Failure, classifier_register, failure_classify, permanent
from orchestration.tools.providers import (
    FunctionProvider,
    ProviderHTTPError,
    ProviderNotConfigured,
    ProviderResultInvalid,
)

RETRY, NEXT, STOP = "retry", "next provider", "stop"


def _what_happens(failure: Failure) -> str:
    if failure.retry:
        return RETRY
    return NEXT if failure.next_provider else STOP


@pytest.mark.parametrize(
    ("exc", "error_class", "code", "outcome"),
    [
        (ProviderHTTPError(429), ErrorClass.TRANSIENT, "provider_throttled", RETRY),
        (ProviderHTTPError(500), ErrorClass.TRANSIENT, "provider_error", RETRY),
        (ProviderHTTPError(503), ErrorClass.TRANSIENT, "provider_error", RETRY),
        (ProviderHTTPError(408), ErrorClass.TRANSIENT, "provider_timeout", RETRY),
        (ProviderHTTPError(400), ErrorClass.PERMANENT, "provider_rejected", STOP),
        (ProviderHTTPError(404), ErrorClass.PERMANENT, "provider_rejected", STOP),
        (ProviderHTTPError(422), ErrorClass.PERMANENT, "provider_rejected", STOP),
        (ProviderHTTPError(401), ErrorClass.PERMANENT, "provider_permission_denied", NEXT),
        (ProviderHTTPError(403), ErrorClass.PERMANENT, "provider_permission_denied", NEXT),
        (httpx.ConnectTimeout("slow"), ErrorClass.TRANSIENT, "provider_timeout", RETRY),
        (httpx.ReadTimeout("slow"), ErrorClass.TRANSIENT, "provider_timeout", RETRY),
        (TimeoutError(), ErrorClass.TRANSIENT, "provider_timeout", RETRY),
        (httpx.ConnectError("refused"), ErrorClass.TRANSIENT, "connection_error", RETRY),
        (ConnectionResetError(), ErrorClass.TRANSIENT, "connection_error", RETRY),
        (PermissionError("no"), ErrorClass.PERMANENT, "permission_denied", NEXT),
        (ProviderResultInvalid("not JSON"), ErrorClass.CONTRACT, "result_contract", NEXT),
        (ProviderNotConfigured("no URL"), ErrorClass.PERMANENT, "provider_not_configured", NEXT),
        (TransientError("busy", code="busy"), ErrorClass.TRANSIENT, "busy", RETRY),
        (PermanentError("no such order", code="no_order"), ErrorClass.PERMANENT, "no_order", STOP),
        (ContractViolation("bad reply"), ErrorClass.CONTRACT, "contract_violation", NEXT),
        (ValueError("a bug"), ErrorClass.TRANSIENT, "provider_exception", RETRY),
    ],
)
def test_default_classification(
    exc: BaseException, error_class: ErrorClass, code: str, outcome: str
) -> None:
    failure = failure_classify(exc)

    assert (failure.error_class, failure.code, _what_happens(failure)) == (
        error_class,
        code,
        outcome,
    )


def test_transient_failures_count_against_the_provider_and_refusals_do_not() -> None:
    assert failure_classify(ProviderHTTPError(503)).provider_fault
    assert failure_classify(ProviderResultInvalid("x")).provider_fault
    assert not failure_classify(ProviderHTTPError(400)).provider_fault
    assert not failure_classify(ProviderNotConfigured("x")).provider_fault


def test_retry_after_is_carried() -> None:
    failure = failure_classify(ProviderHTTPError(429, retry_after=3.0))

    assert failure.retry_after == 3.0


class CardDeclined(Exception):
    pass


def test_a_registered_classifier_extends_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "CLASSIFIERS", list(classify.CLASSIFIERS))
    assert failure_classify(CardDeclined()).code == "provider_exception"

    classifier_register(
        lambda exc: (
            permanent("card_declined", "declined") if isinstance(exc, CardDeclined) else None
        )
    )

    assert failure_classify(CardDeclined()).code == "card_declined"
    assert failure_classify(ProviderHTTPError(503)).code == "provider_error"


def test_a_registered_classifier_can_override_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classify, "CLASSIFIERS", list(classify.CLASSIFIERS))

    def conflict_is_transient(exc: BaseException) -> Failure | None:
        if isinstance(exc, ProviderHTTPError) and exc.status == 409:
            return classify.transient("provider_conflict", "try again")
        return None

    classifier_register(conflict_is_transient)

    assert failure_classify(ProviderHTTPError(409)).retry
    assert not failure_classify(ProviderHTTPError(400)).retry


def test_the_provider_reads_its_own_errors_first() -> None:
    class PickyProvider(FunctionProvider):
        def classify_failure(self, exc: BaseException) -> Failure | None:
            if isinstance(exc, ProviderHTTPError) and exc.status == 503:
                return permanent("maintenance", "down for maintenance")
            return None

    provider = PickyProvider(name="picky", function=lambda params, **kw: {})

    assert failure_classify(ProviderHTTPError(503), provider).code == "maintenance"
    assert failure_classify(ProviderHTTPError(429), provider).code == "provider_throttled"
