"""Workflows that put the engine in the situations its tests assert on."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict

from orchestration.definition import Approval, Degraded, Workflow


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str = "hello"
    seconds: float = 3.0
    failures: int = 1
    count: int = 8
    secret: str = "do not read"
    fail_attempts: int = 99
    permanent: bool = False
    slow_attempts: int = 1
    stubborn: bool = False
    undo_failures: int = 0


slow_then_echo = Workflow("slow_then_echo", input=Loose, max_steps=10)
slow_then_echo.agent("slow", "test_slow", reads=["seconds", "text"], writes=["text"])
slow_then_echo.agent("echo", "test_echo", after="slow", reads=["text"], writes=["echoed"])

# These three fail the run instead of escalating (on_failure="fail"), which their tests assert.
bad_handoff = Workflow("bad_handoff", input=Loose, max_steps=10, on_failure="fail")
bad_handoff.agent("produce", "test_bad_output", reads=["text"], writes=["summary"])
bad_handoff.agent(
    "consume",
    "test_echo",
    after="produce",
    reads=["summary"],
    input=lambda s: {"text": s["summary"]},
)

snooping = Workflow("snooping", input=Loose, max_steps=10, on_failure="fail")
snooping.agent("snoop", "test_snoop", reads=["text"], writes=["text"])

flaky_chain = Workflow("flaky_chain", input=Loose, max_steps=10, on_failure="fail")
flaky_chain.agent("flaky", "test_flaky", reads=["failures"], writes=["text"])

event_timeout_continue = Workflow("event_timeout_continue", input=Loose, max_steps=10)
event_timeout_continue.agent("first", "test_echo", reads=["text"], writes=["text"])
event_timeout_continue.wait(
    "settle",
    event="payment.settled",
    after="first",
    timeout=timedelta(seconds=1),
    on_timeout="continue",
    writes=["settlement"],
)
event_timeout_continue.agent("after", "test_echo", after="settle", reads=["text"], writes=["final"])

event_timeout_fail = Workflow("event_timeout_fail", input=Loose, max_steps=10)
event_timeout_fail.agent("first", "test_echo", reads=["text"], writes=["text"])
event_timeout_fail.wait(
    "settle",
    event="payment.settled",
    after="first",
    timeout=timedelta(seconds=1),
    writes=["settlement"],
)
event_timeout_fail.agent("after", "test_echo", after="settle", reads=["text"], writes=["final"])

parallel_approvals = Workflow("parallel_approvals", input=Loose, max_steps=10)
parallel_approvals.agent("start", "test_echo", reads=["text"], writes=["text"])
parallel_approvals.agent(
    "left", "test_echo", after="start", reads=["text"], writes=["left"], approval=Approval(tier=1)
)
parallel_approvals.agent(
    "right", "test_echo", after="start", reads=["text"], writes=["right"], approval=Approval(tier=2)
)
parallel_approvals.agent(
    "join",
    "test_echo",
    after=["left", "right"],
    reads=["left", "right"],
    input=lambda s: {"text": f"{s['left']}+{s['right']}"},
    writes=["joined"],
)

# Two slow branches after one quick step: with two free workers they must run at the same time.
parallel_slow = Workflow("parallel_slow", input=Loose, max_steps=10)
parallel_slow.agent("start", "test_echo", reads=["text"], writes=["text"])
parallel_slow.agent("left", "test_slow", after="start", reads=["seconds", "text"], writes=["left"])
parallel_slow.agent(
    "right", "test_slow", after="start", reads=["seconds", "text"], writes=["right"]
)
parallel_slow.agent(
    "join",
    "test_echo",
    after=["left", "right"],
    reads=["left", "right"],
    input=lambda s: {"text": f"{s['left']}+{s['right']}"},
    writes=["joined"],
)

endless_review = Workflow("endless_review", input=Loose, max_steps=50)
endless_review.agent("begin", "test_echo", reads=["text"], writes=["text"])
endless_review.agent("draft", "test_echo", after="begin", reads=["text"], writes=["text"])
endless_review.route(
    "gate", after="draft", choose=lambda s: "draft", targets=["draft"], loop_limit=3
)

oversized_fanout = Workflow("oversized_fanout", input=Loose, max_steps=50)
oversized_fanout.agent("plan", "test_many", reads=["count"], writes=["items"])
oversized_fanout.map(
    "work", "test_echo", after="plan", items="items", max_items=6, concurrency=2, writes=["results"]
)

approval_expiry = Workflow("approval_expiry", input=Loose, max_steps=10)
approval_expiry.agent(
    "act",
    "test_echo",
    reads=["text"],
    writes=["text"],
    approval=Approval(timeout=timedelta(seconds=1)),
)

# An approved action whose input changes before it runs: the approval must not apply.
approval_drift = Workflow("approval_drift", input=Loose, max_steps=10)
approval_drift.agent("start", "test_echo", reads=["text"], writes=["text"])
approval_drift.agent(
    "act", "test_echo", after="start", reads=["text"], writes=["acted"], approval=Approval()
)
approval_drift.agent("mutate", "test_echo", after="start", reads=["text"], writes=["text"])

refund_once = Workflow("refund_once", input=Loose, max_steps=10)
refund_once.agent("refund", "test_refund_issuer", reads=["text", "seconds"], writes=["text"])


# --- recovery tiers -------------------------------------------------------------------------------

# Tier 4: the middle step fails (transiently by default) and escalates to an operator.
escalating = Workflow("escalating", input=Loose, max_steps=10)
escalating.agent("start", "test_echo", reads=["text"], writes=["text"])
escalating.agent(
    "act",
    "test_fails_until",
    after="start",
    reads=["text", "fail_attempts", "permanent"],
    writes=["text"],
)
escalating.agent("finish", "test_echo", after="act", reads=["text"], writes=["final"])

# Tier 2: the primary is refused for good; the fallback agent answers.
with_fallback = Workflow("with_fallback", input=Loose, max_steps=10)
with_fallback.agent(
    "answer",
    "test_fails_until",
    reads=["text", "fail_attempts", "permanent"],
    writes=["text"],
    fallback="test_backup",
)
with_fallback.agent("finish", "test_echo", after="answer", reads=["text"], writes=["final"])

# Tier 3: a declared degraded result, and an agent that reports a partial one itself.
with_degraded = Workflow("with_degraded", input=Loose, max_steps=10)
with_degraded.agent(
    "answer",
    "test_fails_until",
    reads=["text", "fail_attempts", "permanent"],
    writes=["text"],
    degraded=Degraded(
        output=lambda failure: {"text": f"summary only ({failure.code})"},
        reason="no sources answered",
    ),
)
with_degraded.agent("gather", "test_partial", after="answer", reads=["text"], writes=["gathered"])

# Soft and hard step timeouts.
sleepy = Workflow("sleepy", input=Loose, max_steps=10, on_failure="fail")
sleepy.agent(
    "nap",
    "test_sleepy",
    reads=["seconds", "slow_attempts", "stubborn"],
    writes=["text"],
    timeout=timedelta(seconds=0.5),
    hard_timeout=timedelta(seconds=1.5),
)

# The retry window stops a storm of transient failures before max_attempts would.
retry_storm = Workflow(
    "retry_storm", input=Loose, max_steps=10, on_failure="fail", retry_within=timedelta(seconds=1)
)
retry_storm.agent(
    "storm", "test_fails_until", reads=["text", "fail_attempts"], writes=["text"], max_attempts=1000
)

# A saga: two side effects, each with its compensation, then a step that fails for good.
saga = Workflow("saga", input=Loose, max_steps=20, on_failure="fail")
saga.agent(
    "reserve",
    "test_effect_action",
    reads=["text", "undo_failures"],
    writes=["reserved"],
    compensate="test_effect_undo",
)
saga.agent(
    "charge",
    "test_effect_action",
    after="reserve",
    reads=["text"],
    writes=["charged"],
    compensate="test_effect_undo",
)
saga.agent(
    "ship",
    "test_fails_until",
    after="charge",
    reads=["text", "fail_attempts", "permanent"],
    writes=["shipped"],
)

# The same side effects, then a wait: cancelling the run undoes them.
saga_waiting = Workflow("saga_waiting", input=Loose, max_steps=20)
saga_waiting.agent(
    "reserve",
    "test_effect_action",
    reads=["text"],
    writes=["reserved"],
    compensate="test_effect_undo",
)
saga_waiting.agent(
    "charge",
    "test_effect_action",
    after="reserve",
    reads=["text"],
    writes=["charged"],
    compensate="test_effect_undo",
)
saga_waiting.wait("settle", event="payment.settled", after="charge", timeout=timedelta(hours=1))


# --- pure agents, started before their predecessor's commit is acknowledged (in-process tests) ---

# The reference workload's shape with agents that are not pure: a sibling is claimed, not run
# before its claim.
siblings = Workflow("siblings", input=Loose, max_steps=10)
siblings.agent("start", "test_echo", reads=["text"], writes=["text"])
siblings.agent("a", "test_echo", after="start", reads=["text"], writes=["a"])
siblings.agent("b", "test_echo", after="start", reads=["text"], writes=["b"])
siblings.agent(
    "joined", "test_echo", after=["a", "b"], join="all", reads=["text"], writes=["joined"]
)

early_chain = Workflow("early_chain", input=Loose, max_steps=10)
early_chain.agent("first", "test_pure_echo", reads=["text"], writes=["text"])
early_chain.agent("held", "test_gated", after="first", reads=["text"], writes=["held"])
early_chain.agent(
    "last",
    "test_pure_echo",
    after="held",
    reads=["held"],
    writes=["last"],
    input=lambda s: {"text": s["held"]},
)

# Three priced pure steps in a row: each successor is claimed (and reserved) by its
# predecessor's completion.
priced_chain = Workflow("priced_chain", input=Loose, max_steps=10)
priced_chain.agent("one", "test_priced_pure", reads=["text"], writes=["text"])
priced_chain.agent("two", "test_priced_pure", after="one", reads=["text"], writes=["text"])
priced_chain.agent("three", "test_priced_pure", after="two", reads=["text"], writes=["text"])

# The same, with "two" hanging on its first attempt: its worker can be killed mid-call while it
# holds the run's budget block.
priced_hang = Workflow("priced_hang", input=Loose, max_steps=10)
priced_hang.agent("one", "test_priced_pure", reads=["text"], writes=["text"])
priced_hang.agent("two", "test_priced_hangs_once", after="one", reads=["text"], writes=["text"])
priced_hang.agent("three", "test_priced_pure", after="two", reads=["text"], writes=["text"])

# While "a" is held, another worker completes "b" (the run row changes under a's completion).
early_branches = Workflow("early_branches", input=Loose, max_steps=10)
early_branches.agent("start", "test_pure_echo", reads=["text"], writes=["text"])
early_branches.agent("a", "test_gated", after="start", reads=["text"], writes=["a"])
early_branches.agent("b", "test_pure_echo", after="start", reads=["text"], writes=["b"])
early_branches.agent(
    "c", "test_pure_echo", after="a", reads=["a"], writes=["c"], input=lambda s: {"text": s["a"]}
)


def _pure_siblings(
    name: str, b_agent: str, *, a_agent: str = "test_pure_echo", others: str = "test_pure_echo"
) -> Workflow:
    wf = Workflow(name, input=Loose, max_steps=10)
    wf.agent("start", others, reads=["text"], writes=["text"])
    wf.agent("a", a_agent, after="start", reads=["text"], writes=["a"])
    wf.agent("b", b_agent, after="start", reads=["text"], writes=["b"])
    wf.agent("joined", others, after=["a", "b"], join="all", reads=["text"], writes=["joined"])
    return wf


# Pure siblings: "b" runs before a's completion is sent and joins its transaction ...
pure_siblings = _pure_siblings("pure_siblings", "test_gated")
# ... unless it acts on the world: its tool call sends a's completion with b's claim first.
pure_effect_siblings = _pure_siblings("pure_effect_siblings", "test_pure_effect")
# Priced pure siblings: "b" is reserved in the transaction that completes "start" and hands it
# off, runs before a's completion is sent, and joins it ...
priced_siblings = _pure_siblings(
    "priced_siblings", "test_priced_pure", a_agent="test_priced_pure", others="test_priced_pure"
)
# ... and with "a" held at a gate, so that another worker can take "b" meanwhile.
priced_gated_siblings = _pure_siblings(
    "priced_gated_siblings", "test_priced_pure", a_agent="test_gated", others="test_priced_pure"
)


# A map of pure items: completing an item reads its siblings' rows, which a batch not sent yet
# would hide; such a completion sends that batch first.
pure_map = Workflow("pure_map", input=Loose, max_steps=20)
pure_map.agent("start", "test_pure_echo", reads=["text"], writes=["text"])
pure_map.map(
    "answer",
    "test_pure_echo",
    after="start",
    items="items",
    max_items=6,
    concurrency=3,
    writes=["answers"],
)
pure_map.agent("summary", "test_pure_echo", after="answer", reads=["text"], writes=["summary"])

early_effect = Workflow("early_effect", input=Loose, max_steps=10)
early_effect.agent("first", "test_gated", reads=["text"], writes=["text"])
early_effect.agent("act", "test_pure_effect", after="first", reads=["text"], writes=["acted"])

# The first of two branches wins; the other is cancelled (its step may still be running).
first_wins = Workflow("first_wins", input=Loose, max_steps=10)
first_wins.agent("start", "test_echo", reads=["text"], writes=["text"])
first_wins.agent("fast", "test_echo", after="start", reads=["text"], writes=["fast"])
first_wins.agent("slow", "test_echo", after="start", reads=["text"], writes=["slow"])
first_wins.agent(
    "done", "test_echo", after=["fast", "slow"], join="any", reads=["text"], writes=["done"]
)

# One call to an OpenAI-compatible endpoint (the environment's SIGNALBOX_LLM_*: a local stub in
# tests), priced by the policy's table under its ceilings; then a free step.
priced_chat = Workflow("priced_chat", input=Loose, max_steps=10)
priced_chat.agent("ask", "llm_chat", reads=["prompt"])
priced_chat.agent("after", "test_echo", after="ask", reads=["text"], writes=["echoed"])

# A refund as one step whose ``amount`` the policy's thresholds tier (the tier matrix).
tiered_refund = Workflow("tiered_refund", input=Loose, max_steps=10)
tiered_refund.agent("refund", "test_echo", reads=["text", "amount"], writes=["text"])
