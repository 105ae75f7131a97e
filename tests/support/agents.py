"""Agents the test suite uses to drive the engine into its edge cases."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from orchestration.agents.base import Agent, AgentContext, CompensationInput
from orchestration.errors import PermanentError, StepTimeout, TransientError


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


# --- recovery: failing, fallback, partial, slow and side-effecting agents --------------------------


class FailsUntil(Agent):
    """Fails on its first ``fail_attempts`` attempts (counting every claim of the step),
    transiently or, with ``permanent``, permanently; then echoes."""

    name = "test_fails_until"
    max_attempts = 2

    class Input(BaseModel):
        model_config = ConfigDict(extra="ignore")
        text: str = "hello"
        fail_attempts: int = 99
        permanent: bool = False

    Output = Text

    def run(self, input: Input, ctx: AgentContext) -> Text:
        if ctx.attempt <= input.fail_attempts:
            if input.permanent:
                raise PermanentError(f"the service refused (attempt {ctx.attempt})", code="refused")
            raise TransientError(
                f"the service is unavailable (attempt {ctx.attempt})", code="unavailable"
            )
        return Text(text=f"ok:{input.text} on attempt {ctx.attempt}")


class BackupAgent(Agent):
    """A fallback that always answers, more modestly."""

    name = "test_backup"
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        return Text(text=f"backup:{input.text}")


class PartialAgent(Agent):
    """Answers from 2 of 5 sources and says so."""

    name = "test_partial"
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        ctx.degrade("partial: 2 of 5 sources")
        return Text(text=f"partial:{input.text}")


class SleepyAgent(Agent):
    """Sleeps ``seconds`` on its first ``slow_attempts`` attempts; ``stubborn`` swallows the
    soft-timeout interruption and keeps sleeping (an agent stuck past its hard timeout)."""

    name = "test_sleepy"
    max_attempts = 3

    class Input(BaseModel):
        model_config = ConfigDict(extra="ignore")
        seconds: float = 3.0
        slow_attempts: int = 1
        stubborn: bool = False

    Output = Text

    def run(self, input: Input, ctx: AgentContext) -> Text:
        if ctx.attempt <= input.slow_attempts:
            until = time.monotonic() + input.seconds
            while time.monotonic() < until:
                try:
                    time.sleep(max(0.0, until - time.monotonic()))
                except StepTimeout:
                    if not input.stubborn:
                        raise
        return Text(text=f"awake on attempt {ctx.attempt}")


class EffectAction(Agent):
    """Applies an outside effect named after its step through the side-effecting capability."""

    name = "test_effect_action"
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        ctx.call_tool("test_effect", {"text": f"do {ctx.step_key}"})
        return Text(text=f"done {ctx.step_key}")


class EffectUndo(Agent):
    """Compensates an :class:`EffectAction`; fails transiently on its first
    ``undo_failures`` attempts when the undone step's input asks for it."""

    name = "test_effect_undo"
    max_attempts = 2
    Input = CompensationInput
    Output = Text

    def run(self, input: CompensationInput, ctx: AgentContext) -> Text:
        failures = int((input.input or {}).get("undo_failures", 0))
        if ctx.attempt <= failures:
            raise TransientError(
                f"undo of {input.step} failed (attempt {ctx.attempt})", code="unavailable"
            )
        ctx.call_tool("test_effect", {"text": f"undo {input.step}"})
        return Text(text=f"undid {input.step}")


# --- pure agents: started before their predecessor's commit is acknowledged ----------------------
# In-process tests only: what they note lives in this process.


class PureEcho(EchoAgent):
    """``test_echo``, declared pure; notes the key of every step it starts, in order."""

    name = "test_pure_echo"
    pure = True
    starts: ClassVar[list[str]] = []

    def run(self, input: Text, ctx: AgentContext) -> Text:
        PureEcho.starts.append(ctx.step_key)
        return super().run(input, ctx)


class PricedPureEcho(EchoAgent):
    """``test_echo``, declared pure and priced: it calls ``known-model`` (a worst case of 100
    tokens in, 100 out) and reports 50 in, 50 out."""

    name = "test_priced_pure"
    pure = True
    model = "known-model"
    estimated_input_tokens = 100
    max_tokens = 100

    def run(self, input: Text, ctx: AgentContext) -> Text:
        ctx.report_usage(prompt_tokens=50, completion_tokens=50, model="known-model")
        return super().run(input, ctx)


class PricedHangsOnce(PricedPureEcho):
    """``test_priced_pure`` that is not pure and, on its first attempt, hangs for a minute
    before its call reports anything (a worker can be killed in the middle of it)."""

    name = "test_priced_hangs_once"
    pure = False

    def run(self, input: Text, ctx: AgentContext) -> Text:
        if ctx.attempt == 1:
            time.sleep(60)
        return super().run(input, ctx)


class GatedAgent(Agent):
    """A pure agent that says it started (``entered``) and waits for the test to open ``gate``."""

    name = "test_gated"
    pure = True
    entered: ClassVar[threading.Event] = threading.Event()
    gate: ClassVar[threading.Event] = threading.Event()
    starts: ClassVar[list[str]] = []
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        GatedAgent.starts.append(ctx.step_key)
        GatedAgent.entered.set()
        if not GatedAgent.gate.wait(20):
            raise TransientError("the test never opened the gate", code="gate_closed")
        gated = f"gated:{input.text}"
        for key in ctx.state.writable:
            ctx.state.set(key, gated)
        return Text(text=gated)

    @classmethod
    def reset(cls) -> None:
        cls.entered.clear()
        cls.gate.clear()
        cls.starts.clear()


class PureEffect(Agent):
    """A pure agent whose one effect goes through the side-effecting ``test_effect`` capability;
    notes when it starts and when its tool call returned."""

    name = "test_pure_effect"
    pure = True
    events: ClassVar[list[str]] = []
    Input = Text
    Output = Text

    def run(self, input: Text, ctx: AgentContext) -> Text:
        PureEffect.events.append("started")
        ctx.call_tool("test_effect", {"text": f"do {ctx.step_key}"})
        PureEffect.events.append("called")
        return Text(text=f"done {ctx.step_key}")
