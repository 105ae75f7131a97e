"""Content pipeline agents: classify a topic, research it from two angles, draft, review, publish."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

from orchestration.agents.base import Agent, AgentContext
from orchestration.agents.demo import DEMO_MODEL, estimate_tokens, simulate_call

Category = Literal["engineering", "product", "operations", "research", "general"]
CATEGORY_KEYWORDS: dict[Category, tuple[str, ...]] = {
    "engineering": ("agent", "workflow", "durable", "api", "database", "code", "system"),
    "product": ("launch", "feature", "customer", "roadmap", "pricing", "user"),
    "operations": ("incident", "on-call", "cost", "compliance", "audit", "policy"),
    "research": ("study", "benchmark", "evaluation", "paper", "experiment"),
}
# Common words that make poor keywords.
STOPWORDS = frozenset(
    {"about", "does", "from", "matters", "should", "that", "this", "what", "with"}
)
SOURCES = (
    "internal design notes",
    "vendor documentation",
    "a 2024 industry survey",
    "customer interviews",
    "a post-incident review",
    "conference talk notes",
)
FINDING_TEMPLATES = {
    "background": (
        "{subject} became a {category} concern once teams ran work longer than one request",
        "Most problems with {subject} trace back to state kept only in memory",
        "The usual alternative to {subject} is a queue plus hand-written retries",
        "{subject} trades some latency for work that survives restarts",
        "Regulated teams adopt {subject} for the audit trail as much as for reliability",
    ),
    "examples": (
        "A support team applied {subject} and cut turnaround time by {percent}%",
        "{teams} teams in one survey moved {subject} out of cron jobs",
        "A payments team used {subject} to stop double refunds after worker crashes",
        "An editorial team added {subject} and halved re-work on drafts",
        "One platform team reported {percent}% fewer pages after adopting {subject}",
    ),
}
# The chance a draft is approved, by revision: early drafts usually get feedback, so the review
# loop is exercised, but by the third revision almost every draft passes.
APPROVAL_CHANCE_BY_REVISION = {1: 0.35, 2: 0.7, 3: 0.9}
FEEDBACK = (
    "Lead with the problem before the solution.",
    "The examples need concrete numbers.",
    "Tighten the introduction; it repeats the title.",
    "Explain the trade-off in the second section.",
    "Add a closing paragraph with a clear next step.",
)


class Classifier(Agent):
    """Puts a topic in a category and extracts keywords for the researchers."""

    name = "classifier"
    model = DEMO_MODEL
    capability = "classify"

    class Input(BaseModel):
        topic: str = Field(min_length=1)
        audience: str = "general readers"

    class Output(BaseModel):
        category: Category
        keywords: list[str]
        confidence: float = Field(ge=0, le=1)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        words = [
            word
            for word in re.findall(r"[a-z][a-z-]+", input.topic.lower())
            if len(word) > 3 and word not in STOPWORDS
        ]
        hits = {
            category: sum(1 for word in words if word.startswith(keywords))
            for category, keywords in CATEGORY_KEYWORDS.items()
        }
        best = max(hits, key=lambda category: hits[category])
        category: Category = best if hits[best] else "general"
        confidence = round(ctx.random.uniform(0.75, 0.98) if hits[best] else 0.5, 2)
        keywords = list(dict.fromkeys(words))[:5] or ["overview"]
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.2, 0.5),
            prompt_tokens=estimate_tokens(input.topic, input.audience) + 120,
            completion_tokens=20 + 4 * len(keywords),
        )
        return self.Output(category=category, keywords=keywords, confidence=confidence)


class Researcher(Agent):
    """Gathers findings on a topic from one angle; the output field is named for that angle."""

    name = "researcher"
    model = DEMO_MODEL
    capability = "research"
    pool = "research"

    class Input(BaseModel):
        topic: str = Field(min_length=1)
        category: str = "general"
        keywords: list[str] = Field(default_factory=list)
        angle: Literal["background", "examples"]

    class Output(BaseModel):
        # Two researchers run in parallel and must write different state keys, so each angle
        # has its own field and a node writes only the one it researched.
        background: list[str] = Field(default_factory=list)
        examples: list[str] = Field(default_factory=list)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        # The two leading keywords usually name the subject ("durable execution").
        subject = " ".join(input.keywords[:2]) or input.topic
        templates = ctx.random.sample(FINDING_TEMPLATES[input.angle], ctx.random.randint(3, 5))
        findings = []
        for template in templates:
            finding = template.format(
                subject=subject,
                category=input.category,
                percent=ctx.random.randint(10, 60),
                teams=ctx.random.randint(3, 40),
            )
            source = ctx.random.choice(SOURCES)
            findings.append(f"{finding[:1].upper()}{finding[1:]} (source: {source})")
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.6, 1.5),
            prompt_tokens=estimate_tokens(input.topic, subject) + 400,
            completion_tokens=estimate_tokens(*findings),
        )
        # Only the field named for this angle is set.
        fields: dict[str, list[str]] = {input.angle: findings}
        return self.Output(**fields)


class Writer(Agent):
    """Drafts the article from both research angles, revising against review feedback."""

    name = "writer"
    model = DEMO_MODEL
    capability = "draft"

    class Input(BaseModel):
        topic: str = Field(min_length=1)
        category: str = "general"
        background: list[str] = Field(default_factory=list)
        examples: list[str] = Field(default_factory=list)
        feedback: str | None = None
        revision: int = Field(default=0, ge=0)

    class Output(BaseModel):
        draft: str = Field(min_length=1)
        revision: int = Field(ge=1)
        word_count: int = Field(ge=1)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        revision = input.revision + 1
        opening = ctx.random.choice(
            ("Every team meets this question sooner or later:", "Here is a short guide to", "On")
        )
        paragraphs = [f"# {input.topic}", f"{opening} {input.topic.lower()} ({input.category})."]
        paragraphs += [f"- {finding}" for finding in input.background]
        paragraphs += [f"- {finding}" for finding in input.examples]
        if input.feedback:
            paragraphs.append(f"(Revision {revision} addresses: {input.feedback})")
        draft = "\n\n".join(paragraphs)
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.8, 1.5),
            prompt_tokens=estimate_tokens(*input.background, *input.examples) + 300,
            completion_tokens=estimate_tokens(draft),
        )
        return self.Output(draft=draft, revision=revision, word_count=len(draft.split()))


class Reviewer(Agent):
    """Approves a draft or sends it back with feedback; later revisions pass more often."""

    name = "reviewer"
    model = DEMO_MODEL
    capability = "review"

    class Input(BaseModel):
        draft: str = Field(min_length=1)
        revision: int = Field(default=1, ge=1)

    class Output(BaseModel):
        approved: bool
        feedback: str
        score: float = Field(ge=0, le=10)

    def run(self, input: Input, ctx: AgentContext) -> Output:
        chance = APPROVAL_CHANCE_BY_REVISION.get(input.revision, 0.95)
        approved = ctx.random.random() < chance
        score = round(ctx.random.uniform(7.5, 9.5) if approved else ctx.random.uniform(4, 7), 1)
        feedback = "Ready to publish." if approved else ctx.random.choice(FEEDBACK)
        simulate_call(
            ctx,
            seconds=ctx.random.uniform(0.4, 0.9),
            prompt_tokens=estimate_tokens(input.draft) + 150,
            completion_tokens=estimate_tokens(feedback) + 10,
        )
        return self.Output(approved=approved, feedback=feedback, score=score)


class Publisher(Agent):
    """Publishes the approved draft and returns where it lives (a side effect, behind approval)."""

    name = "publisher"
    capability = "publish"

    class Input(BaseModel):
        topic: str = Field(min_length=1)
        draft: str = Field(min_length=1)
        category: str = "general"

    class Output(BaseModel):
        published_url: str
        slug: str

    def run(self, input: Input, ctx: AgentContext) -> Output:
        slug = "-".join(re.findall(r"[a-z0-9]+", input.topic.lower()))[:60] or "untitled"
        simulate_call(ctx, seconds=ctx.random.uniform(0.2, 0.4))
        return self.Output(
            published_url=f"https://blog.example.com/{input.category}/{slug}", slug=slug
        )
