"""The benchmark's agent: no work, no randomness, a fixed-size output, so only the engine is measured."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from orchestration.agents.base import Agent, AgentContext
from orchestration.agents.demo import DEMO_MODEL

# About the size of a small real step output, so the engine's write path is not unrealistically cheap.
PAYLOAD_SIZE = 200


class NoopAgent(Agent):
    """Returns a 200-character payload immediately; accepts any input."""

    name = "noop"
    capability = "noop"
    pure = True
    # Priced like the demo agents, so a policy with ceilings reserves and settles for every step
    # (the benchmark's "demo policy on" measures the ledger too); with no ceiling in force the
    # engine reserves nothing.
    model = DEMO_MODEL
    max_tokens = 256
    estimated_input_tokens = 200

    class Input(BaseModel):
        model_config = ConfigDict(extra="allow")

    class Output(BaseModel):
        payload: str = Field(min_length=PAYLOAD_SIZE, max_length=PAYLOAD_SIZE)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        payload = f"{ctx.step_key}:{ctx.attempt}:".ljust(PAYLOAD_SIZE, ".")[:PAYLOAD_SIZE]
        ctx.report_usage(prompt_tokens=120, completion_tokens=PAYLOAD_SIZE // 4, model=DEMO_MODEL)
        return self.Output(payload=payload)
