"""The escalation drill's agent: it fails for good at once, so the drill's run escalates to an
operator through the real path (the same wait, inbox, SLA and notifications as a real failure)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from orchestration.agents.base import Agent, AgentContext
from orchestration.errors import PermanentError


class DrillAlarm(Agent):
    """Raises a permanent error on its first attempt: nothing is called, nothing changes."""

    name = "drill_alarm"
    capability = "drill"
    max_attempts = 1

    class Input(BaseModel):
        model_config = ConfigDict(extra="ignore")
        tier: int = 1
        note: str = ""

    class Output(BaseModel):
        acknowledged: bool = True

    def run(self, input: Input, ctx: AgentContext) -> Output:
        note = f": {input.note}" if input.note else ""
        raise PermanentError(
            f"DRILL: a synthetic escalation at tier {input.tier}{note}", code="drill"
        )
