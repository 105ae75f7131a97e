"""The tool registry: capabilities agents ask for, the providers that serve them, and the call
path that limits, retries, falls over and records every attempt.

Importing this package does not import Django models, so capability modules (and agents) can
use it freely; the client, which builds ``ToolCall`` rows, is loaded on first use.
"""

from __future__ import annotations

from typing import Any

from orchestration.tools.classify import classifier_register, failure_classify
from orchestration.tools.providers import (
    BreakerPolicy,
    Failure,
    FunctionProvider,
    HttpJsonProvider,
    Provider,
    ProviderHTTPError,
    ProviderNotConfigured,
    ProviderResultInvalid,
    ProviderUsage,
    RateLimit,
)
from orchestration.tools.registry import (
    Capability,
    RetryPolicy,
    UnknownCapability,
    capability_get,
    capability_list,
)

_CLIENT_NAMES = {"ToolClient", "ToolCallFailed", "tool_calls_save", "tool_idempotency_key"}

__all__ = [
    "BreakerPolicy",
    "Capability",
    "Failure",
    "FunctionProvider",
    "HttpJsonProvider",
    "Provider",
    "ProviderHTTPError",
    "ProviderNotConfigured",
    "ProviderResultInvalid",
    "ProviderUsage",
    "RateLimit",
    "RetryPolicy",
    "ToolCallFailed",
    "ToolClient",
    "UnknownCapability",
    "capability_get",
    "capability_list",
    "classifier_register",
    "failure_classify",
    "tool_calls_save",
    "tool_idempotency_key",
]


def __getattr__(name: str) -> Any:
    # The client imports orchestration.models, which needs the app registry: load it lazily.
    if name in _CLIENT_NAMES:
        from orchestration.tools import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
