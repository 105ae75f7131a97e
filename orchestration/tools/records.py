"""What a tool call leaves behind: ToolCall rows and audit entries, with every secret removed.

Secrets are removed twice: by name (fields a capability or provider marks secret, and a few
names that are always secret, at any depth) and by value (the provider's API key, the values of
secret fields) wherever they reappear in free text, such as an error body that echoes a header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.services import Entry, audit_record_many
from audit.verbs import Verb
from infra.sql import insert
from orchestration.models import ToolCall, ToolCallStatus
from orchestration.tools.limits import CLOSED, HALF_OPEN, OPEN, CircuitTransition
from orchestration.tools.providers import Failure, Provider, ProviderUsage
from orchestration.tools.registry import Capability

REDACTED = "[redacted]"
#: Names redacted wherever they appear, whatever a capability or provider declares.
ALWAYS_SECRET = frozenset(
    {"api_key", "apikey", "password", "passwd", "secret", "client_secret", "authorization"}
    | {"access_token", "refresh_token", "private_key"}
)
#: Secret values shorter than this are not scrubbed from free text (they would mangle it).
MIN_SCRUBBED_LENGTH = 4
RESULT_SUMMARY_CHARS = 1000
ERROR_MESSAGE_CHARS = 1000

CIRCUIT_VERBS = {
    OPEN: Verb.TOOL_CIRCUIT_OPENED,
    HALF_OPEN: Verb.TOOL_CIRCUIT_HALF_OPENED,
    CLOSED: Verb.TOOL_CIRCUIT_CLOSED,
}
ATTEMPT_VERBS = {
    ToolCallStatus.SUCCEEDED: Verb.TOOL_CALLED,
    ToolCallStatus.FAILED: Verb.TOOL_CALL_FAILED,
    ToolCallStatus.SKIPPED: Verb.TOOL_CALL_SKIPPED,
}


class Redactor:
    """Removes secrets from what is recorded: by field name at any depth, and by value in text."""

    def __init__(self, names: Iterable[str], values: Iterable[str] = ()):
        self.names = frozenset(name.lower() for name in names) | ALWAYS_SECRET
        # Longest first, so a secret that contains another is scrubbed whole.
        found = {value for value in values if len(value) >= MIN_SCRUBBED_LENGTH}
        self.values = sorted(found, key=len, reverse=True)

    @classmethod
    def for_call(cls, capability: Capability, params: dict[str, Any]) -> Redactor:
        """Names from the capability and its providers; values from the params and providers."""
        names = set(capability.secret_params).union(
            *(p.secret_fields for p in capability.providers)
        )
        values = cls(names).secret_values_in(params)
        for provider in capability.providers:
            values += provider.secret_values()
        return cls(names, values)

    def secret_values_in(self, value: Any) -> list[str]:
        """String values of secret-named fields in ``value`` (to scrub wherever they reappear)."""
        found: list[str] = []
        if isinstance(value, Mapping):
            for key, item in value.items():
                if str(key).lower() in self.names and isinstance(item, str):
                    found.append(item)
                else:
                    found.extend(self.secret_values_in(item))
        elif isinstance(value, list | tuple):
            for item in value:
                found.extend(self.secret_values_in(item))
        return found

    def value(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            names = self.names
            return {
                k: REDACTED if str(k).lower() in names else self.value(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        return value

    def text(self, text: str) -> str:
        for secret in self.values:
            text = text.replace(secret, REDACTED)
        return text

    def summary(self, result: Any, limit: int = RESULT_SUMMARY_CHARS) -> str:
        """The result as compact JSON text, redacted, cut at ``limit`` characters."""
        text = json.dumps(
            self.value(result), separators=(",", ":"), default=str, ensure_ascii=False
        )
        return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class CallLog:
    """Builds the records of one call into the caller's lists (``records``, ``entries``)."""

    capability: str
    run_id: int | None
    step_id: int | None
    trace_id: str
    node: str
    call_index: int
    idempotency_key: str
    actor_type: str
    actor_id: str
    redactor: Redactor
    #: The params as recorded (redacted).
    params: dict[str, Any]
    records: list[ToolCall]
    entries: list[Entry]
    #: This call's attempts, in order.
    attempts: list[ToolCall] = field(default_factory=list)

    def attempt(
        self,
        provider: Provider,
        attempt: int,
        status: str,
        *,
        failure: Failure | None = None,
        latency_ms: int = 0,
        result: Any = None,
        usage: ProviderUsage | None = None,
        started_at: datetime | None = None,
    ) -> ToolCall:
        """Record one attempt (a ToolCall row and its audit entry)."""
        status = str(status)
        usage = usage or ProviderUsage()
        message = ""
        if failure is not None:
            body = failure.detail.get("body")
            message = f"{failure.message}: {body}" if body else failure.message
        record = ToolCall(
            run_id=self.run_id,
            step_id=self.step_id,
            trace_id=self.trace_id,
            node=self.node,
            call_index=self.call_index,
            capability=self.capability,
            provider=provider.name,
            attempt=attempt,
            status=status,
            params=self.params,
            result_summary=self.redactor.summary(result) if result is not None else "",
            latency_ms=latency_ms,
            error_class=failure.error_class if failure else "",
            error_code=failure.code if failure else "",
            error_message=self.redactor.text(message)[:ERROR_MESSAGE_CHARS],
            tokens=usage.tokens,
            cost_usd=None if usage.cost_usd is None else Decimal(str(round(usage.cost_usd, 6))),
            idempotency_key=self.idempotency_key,
            created_at=started_at or timezone.now(),
        )
        self.attempts.append(record)
        self.records.append(record)
        data = {
            "capability": self.capability,
            "provider": provider.name,
            "node": self.node,
            "call_index": self.call_index,
            "attempt": attempt,
            "status": status,
            "latency_ms": latency_ms,
            "error_code": record.error_code,
            "idempotency_key": self.idempotency_key,
        }
        self._entry(ATTEMPT_VERBS[ToolCallStatus(status)], "provider", provider.name, data=data)
        return record

    def transition(self, transition: CircuitTransition) -> None:
        """Record a circuit transition this call caused (the system acted, not the agent)."""
        data = {
            "from": transition.from_state,
            "to": transition.to_state,
            "calls": transition.calls,
            "failures": transition.failures,
            "capability": self.capability,
        }
        verb = CIRCUIT_VERBS[transition.to_state]
        self._entry(
            verb, "provider", transition.provider, data=data, actor_type="system", actor_id=""
        )

    def exhausted(self, last: Failure) -> dict[str, Any]:
        """Record that no provider served the call; returns the detail for the error."""
        attempts = [
            {
                "provider": r.provider,
                "attempt": r.attempt,
                "status": r.status,
                "error_class": r.error_class,
                "error_code": r.error_code,
                "latency_ms": r.latency_ms,
                "retry_delay_ms": r.retry_delay_ms,
            }
            for r in self.attempts
        ]
        providers = list(dict.fromkeys(r.provider for r in self.attempts))
        data = {"attempts": len(attempts), "providers": providers, "last_error": last.code}
        self._entry(Verb.TOOL_CALL_EXHAUSTED, "capability", self.capability, data=data)
        return {
            "capability": self.capability,
            "idempotency_key": self.idempotency_key,
            "providers": providers,
            "attempts": attempts,
            "last_error": {
                "class": str(last.error_class),
                "code": last.code,
                "message": self.redactor.text(last.message),
            },
        }

    def _entry(
        self, verb: Verb, object_type: str, object_id: str, *, data: dict[str, Any], **actor: str
    ) -> None:
        self.entries.append(
            Entry(
                verb=verb,
                object_type=object_type,
                object_id=object_id,
                actor_type=actor.get("actor_type", self.actor_type),
                actor_id=actor.get("actor_id", self.actor_id),
                run_id=self.run_id,
                step_id=self.step_id,
                trace_id=self.trace_id,
                payload=self.params,
                data=data,
            )
        )


def tool_calls_save(records: Iterable[ToolCall], audit_entries: Iterable[Entry] = ()) -> None:
    """Insert tool-call records and their audit entries in one transaction (outside the engine)."""
    rows = list(records)
    with transaction.atomic():
        insert(ToolCall, rows)
        audit_record_many(audit_entries)
