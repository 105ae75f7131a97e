"""Demo agents: simulated model calls with realistic time, token usage and rare transient failures.

Everything random comes from ``ctx.random`` so a run replays identically from its seed.
"""

from __future__ import annotations

from orchestration.agents.base import AgentContext
from orchestration.errors import TransientError

DEMO_MODEL = "demo-model"
# Priced like a small hosted model so cost ceilings and the ledger see plausible numbers.
PROMPT_USD_PER_TOKEN = 0.15 / 1_000_000
COMPLETION_USD_PER_TOKEN = 0.60 / 1_000_000
TRANSIENT_FAILURE_RATE = 0.05


def simulate_call(
    ctx: AgentContext,
    *,
    seconds: float,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    failure_rate: float = TRANSIENT_FAILURE_RATE,
) -> None:
    """Spend a model or API call's time, fail transiently now and then, report tokens used."""
    ctx.work(seconds)
    # Only first attempts fail, so the engine's first retry always gets through.
    if ctx.attempt == 1 and ctx.random.random() < failure_rate:
        raise TransientError("demo call timed out (simulated)", detail={"step": ctx.step_key})
    if prompt_tokens or completion_tokens:
        ctx.report_usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=prompt_tokens * PROMPT_USD_PER_TOKEN
            + completion_tokens * COMPLETION_USD_PER_TOKEN,
            model=DEMO_MODEL,
        )


def estimate_tokens(*texts: str) -> int:
    """Roughly four characters per token, as for English text."""
    return max(1, sum(len(text) for text in texts) // 4)
