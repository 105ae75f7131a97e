"""Agents the test suite uses to drive the engine into its edge cases."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from orchestration.agents.base import Agent, AgentContext
from orchestration.errors import TransientError


class Text(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str = ""


class SlowAgent(Agent):
    """Sleeps for real (not scaled): long enough to be killed mid-step."""

    name = "test_slow"
    max_attempts = 3

    class Input(BaseModel):
        seconds: float = 3.0
        text: str = "slow"

    Output = Text

    def run(self, input: Input, ctx: AgentContext) -> Text:
        time.sleep(input.seconds)
        return Text(text=f"{input.text} done")


class EchoAgent(Agent):
    name = "test_echo"
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        echoed = f"echo:{input.text}"
        for key in ctx.state.writable:
            ctx.state.set(key, echoed)
        return Text(text=echoed)


class BadOutputAgent(Agent):
    """Returns a payload that breaks its own output contract (a truncated response)."""

    name = "test_bad_output"
    Input = Text

    class Output(BaseModel):
        summary: str
        score: int

    def run(self, input: Text, ctx: AgentContext) -> dict:
        return {"summary": "truncated respo", "score": "not-a-number"}


class SnoopAgent(Agent):
    """Reads a state key its node did not declare."""

    name = "test_snoop"
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        return Text(text=str(ctx.state.get("secret")))


class FlakyAgent(Agent):
    """Fails transiently on its first ``failures`` attempts."""

    name = "test_flaky"
    max_attempts = 3

    class Input(BaseModel):
        failures: int = 1

    Output = Text

    def run(self, input: Input, ctx: AgentContext) -> Text:
        if ctx.attempt <= input.failures:
            raise TransientError(f"flaky attempt {ctx.attempt}", code="provider_unavailable")
        return Text(text=f"ok on attempt {ctx.attempt}")


class ManyItemsAgent(Agent):
    """A planner that returns as many items as asked (to overflow a fan-out bound)."""

    name = "test_many"

    class Input(BaseModel):
        count: int = 8

    class Output(BaseModel):
        items: list[dict]

    def run(self, input: Input, ctx: AgentContext) -> Output:
        return self.Output(items=[{"text": f"item {i}"} for i in range(input.count)])


class RefundIssuer(Agent):
    """Issues a refund through the side-effecting ``test_effect`` capability, then takes its
    time (long enough to be killed after the effect and before its result is committed)."""

    name = "test_refund_issuer"
    max_attempts = 3

    class Input(BaseModel):
        text: str = "refund order 42"
        seconds: float = 0.0

    Output = Text

    def run(self, input: Input, ctx: AgentContext) -> Text:
        result = ctx.call_tool("test_effect", {"text": input.text})
        time.sleep(input.seconds)
        return Text(text=f"refunded by {result.served_by}")  # type: ignore[attr-defined]
