"""Research brief agents: plan sub-questions, answer each one (a dynamic fan-out), merge."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from orchestration.agents.base import Agent, AgentContext
from orchestration.agents.demo import DEMO_MODEL, estimate_tokens, simulate_call
from orchestration.errors import ContractViolation

MIN_SUBQUESTIONS = 2
MAX_SUBQUESTIONS = 6
# Aspects a sub-question can cover; the planner picks some and attaches them to the question.
ASPECTS = (
    "what problem does it solve, and for whom?",
    "what are the main approaches?",
    "what does it cost to run and to operate?",
    "what are the known failure modes?",
    "how is success measured?",
    "what changed in the last two years?",
    "who has done it well, and what did they learn?",
    "what are the risks of getting it wrong?",
)


class SubquestionAnswer(BaseModel):
    """One worker's answer, as the merger reads it."""

    index: int
    question: str
    answer: str


class Planner(Agent):
    """Splits a research question into 2 to 6 numbered sub-questions for the workers."""

    name = "planner"
    model = DEMO_MODEL
    capability = "plan"

    class Input(BaseModel):
        question: str = Field(min_length=1)
        max_subquestions: int = Field(default=MAX_SUBQUESTIONS, ge=MIN_SUBQUESTIONS)

    class Output(BaseModel):
        subquestions: list[dict[str, Any]] = Field(min_length=MIN_SUBQUESTIONS)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        upper = min(input.max_subquestions, MAX_SUBQUESTIONS)
        subject = input.question.strip().rstrip("?")
        aspects = ctx.random.sample(ASPECTS, ctx.random.randint(MIN_SUBQUESTIONS, upper))
        subquestions: list[dict[str, Any]] = [
            {"index": index, "question": f"{subject}: {aspect}"}
            for index, aspect in enumerate(aspects)
        ]
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.5, 1.0),
            prompt_tokens=estimate_tokens(input.question) + 250,
            completion_tokens=estimate_tokens(*(item["question"] for item in subquestions)),
        )
        return self.Output(subquestions=subquestions)


class SubquestionWorker(Agent):
    """Answers one sub-question of a plan; many run in parallel, one per item."""

    name = "subquestion_worker"
    model = DEMO_MODEL
    capability = "research"
    pool = "research"

    class Input(BaseModel):
        index: int = Field(ge=0)
        question: str = Field(min_length=1)

    class Output(BaseModel):
        index: int
        question: str
        answer: str = Field(min_length=1)
        confidence: float = Field(ge=0, le=1)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        evidence = ctx.random.randint(2, 5)
        answer = (
            f"Based on {evidence} sources, the short answer to '{input.question}' is that it "
            f"depends on scale; teams report the clearest gains after "
            f"{ctx.random.randint(2, 12)} weeks."
        )
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.6, 1.5),
            prompt_tokens=estimate_tokens(input.question) + 600,
            completion_tokens=estimate_tokens(answer),
        )
        return self.Output(
            index=input.index,
            question=input.question,
            answer=answer,
            confidence=round(ctx.random.uniform(0.55, 0.95), 2),
        )


class Merger(Agent):
    """Merges the workers' answers, in plan order, into one brief."""

    name = "merger"
    model = DEMO_MODEL
    capability = "merge"

    class Input(BaseModel):
        question: str = Field(min_length=1)
        answers: list[SubquestionAnswer] = Field(min_length=1)

    class Output(BaseModel):
        brief: str = Field(min_length=1)
        sections: int = Field(ge=1)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        ordered = sorted(input.answers, key=lambda item: item.index)
        indexes = [item.index for item in ordered]
        if len(set(indexes)) != len(indexes):
            raise ContractViolation(
                "answers repeat a sub-question index", detail={"indexes": indexes}
            )
        sections = [f"## {item.question}\n\n{item.answer}" for item in ordered]
        brief = "\n\n".join([f"# Brief: {input.question}", *sections])
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.5, 1.2),
            prompt_tokens=estimate_tokens(*(item.answer for item in ordered)) + 200,
            completion_tokens=estimate_tokens(brief),
        )
        return self.Output(brief=brief, sections=len(sections))
