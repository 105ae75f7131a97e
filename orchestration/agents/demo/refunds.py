"""Refund desk agents: triage a customer message, then refund an order or answer a question."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from orchestration.agents.base import Agent, AgentContext, CompensationInput
from orchestration.agents.demo import DEMO_MODEL, estimate_tokens, simulate_call

REFUND_WORDS = (
    "refund",
    "money back",
    "damaged",
    "broken",
    "return",
    "wrong item",
    "charged twice",
)
# Share of the order total proposed back, by what the customer reports.
REFUND_SHARE_BY_REASON = {"damaged": 1.0, "wrong_item": 1.0, "late": 0.2, "other": 0.5}


class OrderRecord(BaseModel):
    """An order as the order lookup returns it."""

    order_id: str
    customer_id: str
    total: float = Field(ge=0)
    currency: str
    status: str
    items: list[dict[str, Any]]


class RefundProposal(BaseModel):
    """A refund the proposer suggests and the executor carries out."""

    order_id: str
    amount: float = Field(gt=0)
    currency: str
    reason: str


class TriageRouter(Agent):
    """Reads a customer message and routes it to the refund path or the question path."""

    name = "triage_router"
    model = DEMO_MODEL
    capability = "route"

    class Input(BaseModel):
        message: str = Field(min_length=1)

    class Output(BaseModel):
        route: Literal["refund", "question"]
        reason: str

    def run(self, input: Input, ctx: AgentContext) -> Output:
        text = input.message.lower()
        matched = [word for word in REFUND_WORDS if word in text]
        route: Literal["refund", "question"] = "refund" if matched else "question"
        reason = f"mentions {', '.join(matched)}" if matched else "no refund request found"
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.2, 0.5),
            prompt_tokens=estimate_tokens(input.message) + 200,
            completion_tokens=12,
        )
        return self.Output(route=route, reason=reason)


class OrderLookup(Agent):
    """Fetches the order the customer writes about from the order system (the ``lookup_order``
    capability; in the demo, :mod:`orchestration.agents.demo.orders`)."""

    name = "order_lookup"
    capability = "lookup"

    class Input(BaseModel):
        order_id: str = Field(min_length=1)
        customer_id: str = Field(min_length=1)

    class Output(BaseModel):
        order: dict[str, Any]

    def run(self, input: Input, ctx: AgentContext) -> Output:
        simulate_call(ctx, seconds=ctx.random.uniform(0.1, 0.3))
        # The archive times out on every attempt: the step runs out of retries and escalates.
        # A marketplace order comes back without a currency; the proposer's input contract
        # refuses it, where an operator sees it.
        found = ctx.call_tool(
            "lookup_order", {"order_id": input.order_id, "customer_id": input.customer_id}
        )
        return self.Output(order=found.model_dump()["order"])


class RefundProposer(Agent):
    """Proposes a refund amount for an order from what the customer reports."""

    name = "refund_proposer"
    model = DEMO_MODEL
    capability = "propose_refund"

    class Input(BaseModel):
        order: OrderRecord
        message: str = ""

    class Output(BaseModel):
        proposal: dict[str, Any]

    def run(self, input: Input, ctx: AgentContext) -> Output:
        text = input.message.lower()
        if "damaged" in text or "broken" in text:
            reason = "damaged"
        elif "wrong item" in text:
            reason = "wrong_item"
        elif "late" in text:
            reason = "late"
        else:
            reason = "other"
        # A proposal of zero is not a refund; the smallest one is a single currency unit.
        amount = max(round(input.order.total * REFUND_SHARE_BY_REASON[reason], 2), 1.0)
        proposal = RefundProposal(
            order_id=input.order.order_id,
            amount=amount,
            currency=input.order.currency,
            reason=reason,
        )
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.4, 1.0),
            prompt_tokens=estimate_tokens(input.message) + 350,
            completion_tokens=40,
        )
        return self.Output(proposal=proposal.model_dump())


class RefundExecutor(Agent):
    """Issues the refund with the payment provider (side-effecting; behind approval and policy)."""

    name = "refund_executor"
    capability = "execute_refund"

    class Input(BaseModel):
        proposal: RefundProposal

    class Output(BaseModel):
        refund_id: str
        amount: float
        currency: str
        status: Literal["pending_settlement"]

    def run(self, input: Input, ctx: AgentContext) -> Output:
        simulate_call(ctx, seconds=ctx.random.uniform(0.3, 0.8))
        # The id is derived from the run and the order, never from the attempt, so a retried
        # execution names the same refund and a real provider would treat it as idempotent.
        idempotency_key = f"{ctx.run_id}:{ctx.seed}:{input.proposal.order_id}"
        refund_id = "re_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
        return self.Output(
            refund_id=refund_id,
            amount=input.proposal.amount,
            currency=input.proposal.currency,
            status="pending_settlement",
        )


class RefundReverser(Agent):
    """Compensates :class:`RefundExecutor`: voids a refund whose run failed afterwards (the
    settlement never arrived). Keyed by the refund id, so a retried void cannot void twice."""

    name = "refund_reverser"
    capability = "reverse_refund"
    Input = CompensationInput

    class Output(BaseModel):
        refund_id: str
        status: Literal["voided", "nothing_to_void"]

    def run(self, input: CompensationInput, ctx: AgentContext) -> Output:
        simulate_call(ctx, seconds=ctx.random.uniform(0.2, 0.5))
        refund_id = (input.output or {}).get("refund_id")
        if not refund_id:
            return self.Output(refund_id="", status="nothing_to_void")
        return self.Output(refund_id=refund_id, status="voided")


class QuestionAnswerer(Agent):
    """Answers a customer question that is not a refund request."""

    name = "question_answerer"
    model = DEMO_MODEL
    capability = "answer"

    class Input(BaseModel):
        message: str = Field(min_length=1)
        order_id: str | None = None

    class Output(BaseModel):
        answer: str = Field(min_length=1)
        confidence: float = Field(ge=0, le=1)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        about = f" about order {input.order_id}" if input.order_id else ""
        answer = ctx.random.choice(
            (
                f"Thanks for your question{about}. Orders ship within two working days.",
                f"Thanks for writing{about}. You can track the parcel from your account page.",
                f"Good question{about}. Our returns window is 30 days from delivery.",
            )
        )
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.6, 1.2),
            prompt_tokens=estimate_tokens(input.message) + 500,
            completion_tokens=estimate_tokens(answer),
        )
        return self.Output(answer=answer, confidence=round(ctx.random.uniform(0.6, 0.95), 2))


class CustomerNotifier(Agent):
    """Tells the customer the outcome: the settled refund or the answer to their question."""

    name = "customer_notifier"
    capability = "notify"

    class Input(BaseModel):
        customer_id: str = Field(min_length=1)
        channel: Literal["email", "sms"] = "email"
        refund_id: str | None = None
        refund_amount: float | None = None
        currency: str = "EUR"
        answer: str | None = None

        @model_validator(mode="after")
        def _has_something_to_say(self) -> CustomerNotifier.Input:
            if not self.refund_id and not self.answer:
                raise ValueError("a notification needs a refund_id or an answer")
            return self

    class Output(BaseModel):
        notification_id: str
        channel: str
        body: str

    def run(self, input: Input, ctx: AgentContext) -> Output:
        if input.refund_id:
            amount = (
                f" of {input.refund_amount:.2f} {input.currency}" if input.refund_amount else ""
            )
            body = f"Your refund{amount} has been issued (reference {input.refund_id})."
        else:
            body = input.answer or ""
        simulate_call(ctx, seconds=ctx.random.uniform(0.1, 0.3))
        # Sent through the email or SMS capability: the tool registry gives the call an
        # idempotency key that is the same on every attempt, so a retried send goes out once.
        if input.channel == "email":
            sent = ctx.call_tool(
                "send_email",
                {
                    "to": f"{input.customer_id}@example.com",
                    "subject": "About your order",
                    "body": body,
                },
            )
        else:
            digits = int(hashlib.sha256(input.customer_id.encode()).hexdigest()[:8], 16) % 10**8
            sent = ctx.call_tool("send_sms", {"to": f"+4915{digits:08d}", "body": body[:480]})
        notification_id = "ntf_" + str(sent.model_dump()["message_id"]).split("_", 1)[-1]
        return self.Output(notification_id=notification_id, channel=input.channel, body=body)
