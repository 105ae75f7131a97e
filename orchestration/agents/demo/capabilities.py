"""The demo's capabilities: the order system, email and SMS, served by in-process providers.

The refund desk's agents reach them through ``ctx.call_tool`` like any real service, so the tool
registry retries, falls over, limits and records their calls, and the Tools page shows their
health: the order system's lookups of archived orders time out (and count against its health),
and the primary SMS gateway turns some messages away, which its backup then sends.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field

from orchestration.agents.demo.orders import OrderArchived, order_for
from orchestration.tools.providers import (
    BreakerPolicy,
    FunctionProvider,
    ProviderHTTPError,
    RateLimit,
)
from orchestration.tools.registry import Capability, RetryPolicy

#: Share of messages the primary SMS gateway refuses (by message key, so a retry is refused too).
SMS_PRIMARY_REFUSAL_SHARE = 0.1


def _message_id(prefix: str, key: str | None, params: dict[str, Any]) -> str:
    # The same for every attempt of one call: a real provider deduplicates on the key.
    seed = key or repr(sorted(params.items()))
    return f"{prefix}_{hashlib.sha256(seed.encode()).hexdigest()[:16]}"


# --- the order system -----------------------------------------------------------------------------


class OrderQuery(BaseModel):
    order_id: str = Field(min_length=1)
    customer_id: str = Field(min_length=1)


class OrderFound(BaseModel):
    order: dict[str, Any]


def _orders_lookup(
    params: dict[str, Any], *, idempotency_key: str | None, timeout: float
) -> dict[str, Any]:
    try:
        return {"order": order_for(params["order_id"], params["customer_id"])}
    except OrderArchived as exc:
        raise TimeoutError(str(exc)) from None


lookup_order = Capability(
    name="lookup_order",
    description="Look an order up in the shop's order system (archived orders time out).",
    Params=OrderQuery,
    Result=OrderFound,
    providers=(
        FunctionProvider(
            name="demo-orders",
            priority=10,
            timeout_seconds=5,
            function=_orders_lookup,
            # One archived order fails six times (two tries, three step attempts): that alone
            # must not open the circuit on every other lookup.
            breaker=BreakerPolicy(failure_rate=0.8, min_calls=30),
        ),
    ),
    retry=RetryPolicy(
        max_attempts=2, base_seconds=0.1, max_delay_seconds=0.5, time_budget_seconds=5
    ),
)


# --- email and SMS --------------------------------------------------------------------------------


class EmailMessage(BaseModel):
    to: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    subject: str = Field(min_length=1, max_length=200)
    body: str = Field(min_length=1)


class SmsMessage(BaseModel):
    to: str = Field(pattern=r"^\+[0-9]{8,15}$")
    body: str = Field(min_length=1, max_length=480)


class MessageSent(BaseModel):
    message_id: str
    gateway: str


def _mail_send(
    params: dict[str, Any], *, idempotency_key: str | None, timeout: float
) -> dict[str, Any]:
    return {"message_id": _message_id("eml", idempotency_key, params), "gateway": "demo-mail"}


def _sms_primary(
    params: dict[str, Any], *, idempotency_key: str | None, timeout: float
) -> dict[str, Any]:
    message_id = _message_id("sms", idempotency_key, params)
    if int(message_id[-4:], 16) / 0xFFFF < SMS_PRIMARY_REFUSAL_SHARE:
        raise ProviderHTTPError(503, body="gateway busy, try another route")
    return {"message_id": message_id, "gateway": "demo-sms"}


def _sms_backup(
    params: dict[str, Any], *, idempotency_key: str | None, timeout: float
) -> dict[str, Any]:
    return {"message_id": _message_id("sms", idempotency_key, params), "gateway": "demo-sms-backup"}


send_email = Capability(
    name="send_email",
    description="Email a customer (the demo policy allows only allowlisted domains without approval).",
    Params=EmailMessage,
    Result=MessageSent,
    providers=(
        FunctionProvider(
            name="demo-mail",
            priority=10,
            timeout_seconds=5,
            rate_limit=RateLimit(per_second=5, burst=10),
            function=_mail_send,
        ),
    ),
    side_effects=True,
)
send_sms = Capability(
    name="send_sms",
    description="Text a customer; the backup gateway takes what the primary turns away.",
    Params=SmsMessage,
    Result=MessageSent,
    providers=(
        FunctionProvider(name="demo-sms", priority=10, timeout_seconds=5, function=_sms_primary),
        FunctionProvider(
            name="demo-sms-backup", priority=20, timeout_seconds=5, function=_sms_backup
        ),
    ),
    side_effects=True,
    retry=RetryPolicy(
        max_attempts=1, base_seconds=0.1, max_delay_seconds=0.5, time_budget_seconds=10
    ),
)
