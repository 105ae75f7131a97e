"""Research brief: a planner splits a question into sub-questions, one worker answers each (a
bounded dynamic fan-out), and a merger writes the brief from the answers in plan order."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from orchestration.definition import Degraded, Failure, Workflow


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


def unanswered(failure: Failure) -> dict[str, Any]:
    item = failure.input or {}
    return {
        "index": item.get("index", 0),
        "question": item.get("question") or "(unknown)",
        "answer": f"No answer: {failure.message}",
        "confidence": 0.0,
    }


research_brief.map(
    "answer",
    "subquestion_worker",
    after="plan",
    items="subquestions",
    max_items=6,
    concurrency=3,
    writes=["answers"],
    # One sub-question that cannot be answered does not sink the brief: it is merged as
    # unanswered, and the run says which one was degraded.
    degraded=Degraded(output=unanswered, reason="sub-question left unanswered"),
)
research_brief.agent(
    "merge", "merger", after="answer", reads=["question", "answers"], writes=["brief"]
)
