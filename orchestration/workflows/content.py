"""Content pipeline: classify, research two angles in parallel, draft, review in a bounded loop,
and publish once a human approves."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from orchestration.definition import Approval, StateReader, Workflow

MAX_DRAFTS = 3


class ContentPipelineInput(BaseModel):
    """What to write about and for whom."""

    topic: str = Field(default="Why durable execution matters for AI agent workflows", min_length=1)
    audience: str = "engineering leads"


def research_input(angle: str) -> Callable[[StateReader], dict[str, Any]]:
    """The researcher's input for one angle; both angles read the same classification."""

    def build(state: StateReader) -> dict[str, Any]:
        return {
            "topic": state["topic"],
            "category": state.get("category") or "general",
            "keywords": state.get("keywords") or [],
            "angle": angle,
        }

    return build


def draft_input(state: StateReader) -> dict[str, Any]:
    # Feedback and revision are absent on the first pass and set by the review loop after it.
    return {
        "topic": state["topic"],
        "category": state.get("category") or "general",
        "background": state.get("background") or [],
        "examples": state.get("examples") or [],
        "feedback": state.get("feedback"),
        "revision": state.get("revision") or 0,
    }


def review_next(state: StateReader) -> str:
    return "publish" if state.get("approved") else "draft"


content_pipeline = Workflow(
    "content_pipeline",
    version=1,
    input=ContentPipelineInput,
    description=(
        "Classify a topic, research it from two angles in parallel, draft and review up to "
        f"{MAX_DRAFTS} times, then publish after a tier-1 approval."
    ),
    max_steps=30,
    max_duration=timedelta(hours=8),
)
content_pipeline.agent(
    "classify", "classifier", reads=["topic", "audience"], writes=["category", "keywords"]
)
content_pipeline.agent(
    "research_a",
    "researcher",
    after="classify",
    reads=["topic", "category", "keywords"],
    input=research_input("background"),
    writes=["background"],
)
content_pipeline.agent(
    "research_b",
    "researcher",
    after="classify",
    reads=["topic", "category", "keywords"],
    input=research_input("examples"),
    writes=["examples"],
)
content_pipeline.agent(
    "draft",
    "writer",
    after=["research_a", "research_b"],
    join="all",
    reads=["topic", "category", "background", "examples", "feedback", "revision"],
    input=draft_input,
    writes=["draft", "revision"],
)
content_pipeline.agent(
    "review",
    "reviewer",
    after="draft",
    reads=["draft", "revision"],
    writes=["approved", "feedback"],
)
content_pipeline.route(
    "review_gate",
    after="review",
    reads=["approved"],
    choose=review_next,
    targets=["draft", "publish"],
    loop_limit=MAX_DRAFTS,
    on_loop_limit="publish",
)
content_pipeline.agent(
    "publish",
    "publisher",
    reads=["topic", "draft", "category"],
    writes=["published_url"],
    approval=Approval(
        tier=1, timeout=timedelta(hours=4), reason="publishing is visible to the public"
    ),
)
