"""Providers: the code that talks to one outside service on behalf of a capability.

The SDK or HTTP client lives here and nowhere else; agents ask for a capability and never see
which provider served it. A provider declares its limits (rate, timeout, circuit breaker) and
which names are secret, so the tool client can enforce the first and redact the second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from django.conf import settings

from orchestration.errors import ErrorClass


@dataclass(frozen=True)
class Failure:
    """One failed attempt, classified. ``code`` is stable; ``message`` is for people."""

    error_class: ErrorClass
    code: str
    message: str
    #: Try the same provider again, after a backoff delay.
    retry: bool
    #: When not retried (or out of attempts), another provider may still serve the call.
    next_provider: bool
    #: Counts as a failure of the provider for its circuit breaker.
    provider_fault: bool
    #: Seconds the provider asked us to wait (a ``Retry-After`` header), if it said.
    retry_after: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


#: Provider names become Redis keys and audit object ids: keep them plain.
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
#: How much of a refusal's body a failure keeps: enough to read the reason.
ERROR_BODY_EXCERPT = 500


@dataclass(frozen=True)
class RateLimit:
    """Calls per second for one provider, shared by every worker process, plus a burst."""

    per_second: float
    burst: int = 1
    #: A call waits this long at most for a token, then fails transient ("rate_limited").
    max_wait_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1 or self.max_wait_seconds < 0:
            raise ValueError(f"invalid rate limit {self!r}")


@dataclass(frozen=True)
class BreakerPolicy:
    """When a provider's circuit opens (failure rate over a rolling window) and for how long."""

    failure_rate: float = 0.5
    #: Fewer calls than this in the window never open the circuit.
    min_calls: int = 10
    window_seconds: float = 60.0
    #: Open this long before one probe call is let through (half-open).
    cooldown_seconds: float = 30.0

    def __post_init__(self) -> None:
        if (
            not 0 < self.failure_rate <= 1
            or self.min_calls < 1
            or self.window_seconds <= 0
            or self.cooldown_seconds < 0
        ):
            raise ValueError(f"invalid breaker policy {self!r}")


@dataclass(frozen=True)
class ProviderUsage:
    """Tokens and cost a provider reported for one call (``None``: it did not say)."""

    tokens: int | None = None
    cost_usd: float | None = None


class ProviderHTTPError(Exception):
    """The provider answered with a non-2xx status."""

    def __init__(
        self, status: int, *, body: str = "", retry_after: float | None = None, url: str = ""
    ):
        super().__init__(f"provider answered {status}")
        self.status = status
        self.body = body[:ERROR_BODY_EXCERPT]
        self.retry_after = retry_after
        self.url = url


class ProviderResultInvalid(Exception):
    """The provider's reply is not something a result can be read from (not a JSON object)."""


class ProviderNotConfigured(Exception):
    """The provider lacks configuration (a URL, a key) in this deployment."""


@dataclass(kw_only=True, eq=False)
class Provider:
    """One way to serve a capability. Subclasses implement :meth:`call`."""

    name: str
    #: Lower numbers are tried first; equal priorities keep their declared order.
    priority: int = 100
    timeout_seconds: float = 10.0
    rate_limit: RateLimit | None = None
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    #: Param, result or config names whose values never appear in records (any nesting depth).
    secret_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not PROVIDER_NAME.match(self.name):
            raise ValueError(f"provider name {self.name!r} must match {PROVIDER_NAME.pattern}")
        if self.timeout_seconds <= 0:
            raise ValueError(f"provider {self.name}: timeout_seconds must be positive")
        self.secret_fields = frozenset(name.lower() for name in self.secret_fields)

    def call(
        self, params: dict[str, Any], *, idempotency_key: str | None, timeout: float
    ) -> dict[str, Any]:
        """Do the call and return the raw result; raise on failure (see ``classify``).

        ``idempotency_key`` is set for side-effecting capabilities and must reach the service,
        so a retried call does not repeat the effect."""
        raise NotImplementedError

    def classify_failure(self, exc: BaseException) -> Failure | None:
        """This provider's own reading of an error, before the shared classifiers (None: no view)."""
        return None

    def usage(self, result: dict[str, Any]) -> ProviderUsage:
        """Tokens and cost from a result's ``usage`` object, when the service reports one."""
        usage = result.get("usage")
        if not isinstance(usage, dict):
            return ProviderUsage()
        tokens = usage.get("total_tokens", usage.get("tokens"))
        if tokens is None and ("prompt_tokens" in usage or "completion_tokens" in usage):
            tokens = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
        cost = usage.get("cost_usd")
        return ProviderUsage(
            tokens=int(tokens) if isinstance(tokens, int | float) else None,
            cost_usd=float(cost) if isinstance(cost, int | float) else None,
        )

    def secret_values(self) -> list[str]:
        """Configured secret values (API keys) to scrub from anything recorded."""
        return []

    def describe(self) -> dict[str, Any]:
        """What an API or console may show about this provider; never a secret."""
        return {
            "name": self.name,
            "kind": type(self).__name__,
            "priority": self.priority,
            "timeout_seconds": self.timeout_seconds,
            "rate_limit": asdict(self.rate_limit) if self.rate_limit else None,
            "breaker": asdict(self.breaker),
        }


@dataclass(kw_only=True, eq=False)
class FunctionProvider(Provider):
    """A provider that is a Python function: in-process tools, simulations, demos."""

    function: Callable[..., dict[str, Any]]

    def call(
        self, params: dict[str, Any], *, idempotency_key: str | None, timeout: float
    ) -> dict[str, Any]:
        return self.function(params, idempotency_key=idempotency_key, timeout=timeout)


@dataclass(kw_only=True, eq=False)
class HttpJsonProvider(Provider):
    """POSTs the params as JSON to a URL and reads a JSON object back.

    The URL comes from the environment variable ``url_env`` when set, else from
    ``settings.SIGNALBOX_PROVIDER_URLS[name]``, else ``url``, so a deployment points a provider
    elsewhere without a code change. The bearer key is read from the environment variable
    ``api_key_env`` at call time and never leaves this method except in the header."""

    url: str = ""
    url_env: str = ""
    api_key_env: str = ""

    def endpoint(self) -> str:
        configured = getattr(settings, "SIGNALBOX_PROVIDER_URLS", {}).get(self.name, "")
        url = (os.environ.get(self.url_env, "") if self.url_env else "") or configured or self.url
        return url.strip()

    def _api_key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""

    def call(
        self, params: dict[str, Any], *, idempotency_key: str | None, timeout: float
    ) -> dict[str, Any]:
        url = self.endpoint()
        if not url:
            where = f"${self.url_env} or " if self.url_env else ""
            raise ProviderNotConfigured(
                f"provider {self.name} has no URL; set {where}SIGNALBOX_PROVIDER_URLS[{self.name!r}]"
            )
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        response = httpx.post(url, json=params, headers=headers, timeout=timeout)
        if not 200 <= response.status_code < 300:
            raise ProviderHTTPError(
                response.status_code,
                body=response.text,
                retry_after=_retry_after(response),
                url=url,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderResultInvalid(f"provider {self.name} did not answer JSON") from exc
        if not isinstance(body, dict):
            raise ProviderResultInvalid(f"provider {self.name} answered JSON that is not an object")
        return body

    def secret_values(self) -> list[str]:
        key = self._api_key()
        return [key] if key else []

    def describe(self) -> dict[str, Any]:
        # The URL may embed credentials (user:pass@host), so only the host is shown.
        return {
            **super().describe(),
            "host": httpx.URL(self.endpoint()).host if self.endpoint() else "",
        }


def _retry_after(response: httpx.Response) -> float | None:
    # Only the seconds form; an HTTP date is rare from APIs and the backoff covers it anyway.
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
