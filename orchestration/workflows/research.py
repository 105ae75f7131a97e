"""Research brief: a planner splits a question into sub-questions, one worker answers each (a
bounded dynamic fan-out), and a merger writes the brief from the answers in plan order."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field

from orchestration.definition import Workflow


class ResearchBriefInput(BaseModel):
    """The question to research."""

    question: str = Field(
        default="How should a team adopt durable orchestration for AI agents?", min_length=1
    )
    max_subquestions: int = Field(default=6, ge=2, le=6)


research_brief = Workflow(
    "research_brief",
    version=1,
    input=ResearchBriefInput,
    description=(
        "Plan 2-6 sub-questions, answer them in parallel (at most 3 at a time), merge a brief."
    ),
    max_steps=20,
    max_duration=timedelta(hours=1),
)
research_brief.agent(
    "plan", "planner", reads=["question", "max_subquestions"], writes=["subquestions"]
)
research_brief.map(
    "answer",
    "subquestion_worker",
    after="plan",
    items="subquestions",
    max_items=6,
    concurrency=3,
    writes=["answers"],
)
research_brief.agent(
    "merge", "merger", after="answer", reads=["question", "answers"], writes=["brief"]
)
