"""Escalation drills: a run whose only step escalates at once, at the tier asked for, so that
an admin can check that the people on call are alerted and answer. Runs of this workflow are
drills (``Run.is_drill``) and are shown as DRILL everywhere."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field

from orchestration.definition import Workflow
from orchestration.models import DRILL_WORKFLOW


class DrillInput(BaseModel):
    tier: int = Field(default=1, ge=1, le=3)
    note: str = Field(default="", max_length=500)


drill = Workflow(
    DRILL_WORKFLOW,
    version=1,
    input=DrillInput,
    description="Escalation drill: one step that escalates to an operator at once, at the tier asked for.",
    max_steps=5,
    max_duration=timedelta(days=2),
)
drill.agent("alarm", "drill_alarm", reads=["tier", "note"])
