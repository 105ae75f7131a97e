"""The benchmark's reference workload: the content pipeline's shape with no-op agents, so a
benchmark measures the engine (dispatch, fan-out, join, approval) rather than the agents."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel

from orchestration.definition import Approval, Workflow


class ReferenceWorkloadInput(BaseModel):
    """Benchmark knobs: ``needs_approval`` puts a human approval before the last step."""

    topic: str = "bench"
    needs_approval: bool = False


reference_workload = Workflow(
    "reference_workload",
    version=1,
    input=ReferenceWorkloadInput,
    description=(
        "Benchmark shape: classify, two parallel steps, a join, then publish (behind an approval "
        "when needs_approval is set). Every agent is a no-op."
    ),
    max_steps=10,
    max_duration=timedelta(hours=1),
)
reference_workload.agent("classify", "noop", reads=["topic"])
reference_workload.agent("research_a", "noop", after="classify", reads=["topic"])
reference_workload.agent("research_b", "noop", after="classify", reads=["topic"])
reference_workload.agent(
    "draft", "noop", after=["research_a", "research_b"], join="all", reads=["topic"]
)
reference_workload.agent(
    "publish",
    "noop",
    after="draft",
    reads=["topic", "needs_approval"],
    approval=Approval(
        tier=1,
        timeout=timedelta(hours=1),
        when=lambda state: state.get("needs_approval", False),
        reason="benchmark approval",
    ),
)
