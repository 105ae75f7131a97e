"""Refund desk: a routing agent triages a customer message; refunds above a threshold need a
human approval and wait for the payment provider to settle; questions are answered directly."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestration.definition import FAIL, Approval, StateReader, Workflow

REFUND_APPROVAL_THRESHOLD = 100.0


class RefundDeskInput(BaseModel):
    """A customer's message about an order."""

    customer_id: str = Field(default="cus_demo_1001", min_length=1)
    order_id: str = Field(default="ord_demo_5001", min_length=1)
    message: str = Field(
        default="My headset arrived damaged. I would like a refund, please.", min_length=1
    )
    channel: Literal["email", "sms"] = "email"


def refund_needs_approval(state: Mapping[str, Any]) -> bool:
    """Refunds above the threshold need a human; an unknown amount fails closed."""
    proposal = state.get("proposal") or {}
    amount = proposal.get("amount")
    return amount is None or float(amount) > REFUND_APPROVAL_THRESHOLD


def notify_input(state: StateReader) -> dict[str, Any]:
    # Exactly one path ran: the refund path leaves a refund id, the question path an answer.
    proposal = state.get("proposal") or {}
    return {
        "customer_id": state["customer_id"],
        "channel": state.get("channel") or "email",
        "refund_id": state.get("refund_id"),
        "refund_amount": proposal.get("amount"),
        "currency": proposal.get("currency") or "EUR",
        "answer": state.get("answer"),
    }


refund_desk = Workflow(
    "refund_desk",
    version=1,
    input=RefundDeskInput,
    description=(
        "Triage a customer message; refund the order (approval above "
        f"{REFUND_APPROVAL_THRESHOLD:.0f}, then wait for settlement) or answer the question; "
        "notify the customer."
    ),
    max_steps=20,
    max_duration=timedelta(hours=24),
)
refund_desk.agent(
    "triage",
    "triage_router",
    reads=["message"],
    writes=["route"],
    routes={"refund": "lookup_order", "question": "answer_question"},
)
refund_desk.agent(
    "lookup_order", "order_lookup", reads=["order_id", "customer_id"], writes=["order"]
)
refund_desk.agent(
    "propose_refund",
    "refund_proposer",
    after="lookup_order",
    reads=["order", "message"],
    writes=["proposal"],
)
refund_desk.agent(
    "execute_refund",
    "refund_executor",
    after="propose_refund",
    reads=["proposal"],
    writes=["refund_id"],
    # Moving money gets one retry at most, so a stuck refund reaches a person quickly; the refund
    # id is the same on every attempt, so that retry cannot pay twice.
    max_attempts=2,
    # If the run fails later (the settlement never comes), the refund is reversed.
    compensate="refund_reverser",
    approval=Approval(
        tier=1,
        timeout=timedelta(hours=8),
        when=refund_needs_approval,
        reason=f"refund above {REFUND_APPROVAL_THRESHOLD:.0f}",
    ),
)
refund_desk.wait(
    "settlement",
    event="payment.settled",
    after="execute_refund",
    timeout=timedelta(minutes=30),
    on_timeout=FAIL,
    writes=["settlement"],
)
refund_desk.agent(
    "answer_question", "question_answerer", reads=["message", "order_id"], writes=["answer"]
)
refund_desk.agent(
    "notify_customer",
    "customer_notifier",
    after=["settlement", "answer_question"],
    join="any",
    reads=["customer_id", "channel", "refund_id", "proposal", "answer", "settlement"],
    input=notify_input,
    writes=["notification_id"],
)
