"""Capabilities and their explicit registry: capability name -> dotted path of a Capability.

A capability is what an agent asks for ("web_search", "issue_refund"): typed params and result,
whether it has side effects, and the providers that can serve it, in priority order. Entries
are imported lazily on first use; ``settings.SIGNALBOX_CAPABILITIES`` adds or replaces entries
so a deployment (or the test suite) registers its own; an unknown name is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from typing import Any

from django.conf import settings
from pydantic import BaseModel

from orchestration.errors import Code, PermanentError
from orchestration.tools.providers import Provider

#: Capabilities every deployment has: the demo's (its order system, email and SMS), which the
#: built-in refund desk calls.
BUILTIN_CAPABILITIES: dict[str, str] = {
    "lookup_order": "orchestration.agents.demo.capabilities:lookup_order",
    "send_email": "orchestration.agents.demo.capabilities:send_email",
    "send_sms": "orchestration.agents.demo.capabilities:send_sms",
}


class UnknownCapability(PermanentError):
    """No capability is registered under that name."""

    code = Code.UNKNOWN_CAPABILITY


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries: attempts per provider, backoff, and a budget for the whole call."""

    #: Attempts on each provider before moving to the next one.
    max_attempts: int = 3
    #: Backoff before attempt n+1 is uniform(0, min(max_delay, base * 2**(n-1))) ("full jitter").
    base_seconds: float = 0.2
    max_delay_seconds: float = 5.0
    #: Wall time for the whole call across every provider; nothing starts after it runs out.
    time_budget_seconds: float = 30.0

    def __post_init__(self) -> None:
        if (
            self.max_attempts < 1
            or self.base_seconds < 0
            or self.max_delay_seconds < 0
            or self.time_budget_seconds <= 0
        ):
            raise ValueError(f"invalid retry policy {self!r}")

    def delay_bound(self, attempt: int) -> float:
        """The upper bound of the jittered delay after failed attempt ``attempt`` (1-based)."""
        return float(min(self.max_delay_seconds, self.base_seconds * 2 ** (attempt - 1)))


@dataclass(frozen=True, eq=False)
class Capability:
    """Something an agent can ask for, with its contracts and the providers that serve it."""

    name: str
    Params: type[BaseModel]
    Result: type[BaseModel]
    providers: tuple[Provider, ...]
    #: Side-effecting calls carry an idempotency key derived from (run, node, call index).
    side_effects: bool = False
    #: Param names whose values never appear in records, on top of each provider's own.
    secret_params: frozenset[str] = frozenset()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(
            self, "secret_params", frozenset(name.lower() for name in self.secret_params)
        )
        if not self.providers:
            raise ValueError(f"capability {self.name!r} has no providers")
        names = [provider.name for provider in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"capability {self.name!r} lists a provider twice: {names}")
        for model in (self.Params, self.Result):
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise TypeError(f"capability {self.name!r}: {model!r} is not a pydantic model")

    def providers_in_order(self) -> list[Provider]:
        """Providers by priority (lowest first); ties keep their declared order."""
        return sorted(self.providers, key=lambda provider: provider.priority)

    def describe(self) -> dict[str, Any]:
        """What an API or console may show: contracts as JSON Schema, providers, never secrets."""
        return {
            "name": self.name,
            "description": self.description,
            "side_effects": self.side_effects,
            "params_schema": self.Params.model_json_schema(),
            "result_schema": self.Result.model_json_schema(),
            "providers": [provider.describe() for provider in self.providers_in_order()],
        }


def capability_paths() -> dict[str, str]:
    """Every registered capability name and the dotted path (``module:attribute``) it loads."""
    return {**BUILTIN_CAPABILITIES, **getattr(settings, "SIGNALBOX_CAPABILITIES", {})}


def capability_get(name: str) -> Capability:
    """The capability registered as ``name``; :class:`UnknownCapability` if there is none."""
    path = capability_paths().get(name)
    if path is None:
        raise UnknownCapability(
            f"no capability is registered as {name!r}", detail={"capability": name}
        )
    capability = _load(path)
    if capability.name != name:
        raise UnknownCapability(
            f"{path} is the capability {capability.name!r}, registered as {name!r}",
            detail={"capability": name, "path": path},
        )
    return capability


def capability_list() -> list[Capability]:
    """Every registered capability, by name (imports them all)."""
    return [capability_get(name) for name in sorted(capability_paths())]


@cache
def _load(path: str) -> Capability:
    # Cached per path, not per name, so a settings override in a test takes effect at once.
    module_name, _, attribute = path.partition(":")
    try:
        found = getattr(import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise UnknownCapability(
            f"cannot import capability {path!r}: {exc}", detail={"path": path}
        ) from exc
    if not isinstance(found, Capability):
        raise UnknownCapability(f"{path} is not a Capability", detail={"path": path})
    return found
