"""Demo agents and built-in workflows, outside the engine: contracts, determinism, graph shape."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from importlib import import_module
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from orchestration.agents.base import Agent, AgentContext
from orchestration.agents.demo import content, noop, orders, refunds, research
from orchestration.definition import END, FAIL, Workflow
from orchestration.errors import TransientError
from orchestration.registry import BUILTIN_AGENTS, BUILTIN_WORKFLOWS
from orchestration.tools.client import ToolClient
from orchestration.tools.limit_backends import MemoryBackend
from orchestration.tools.limits import CircuitBreaker, RateLimiter
from orchestration.workflows.content import content_pipeline
from orchestration.workflows.reference import reference_workload
from orchestration.workflows.refunds import refund_desk, refund_needs_approval
from orchestration.workflows.research import research_brief

ORDER = {
    "order_id": "ord_1",
    "customer_id": "cus_1",
    "total": 150.0,
    "currency": "EUR",
    "status": "delivered",
    "items": [{"sku": "sku-chair", "name": "Desk chair", "quantity": 1, "price": 150.0}],
}
PROPOSAL = {"order_id": "ord_1", "amount": 150.0, "currency": "EUR", "reason": "damaged"}
DRAFT = "# Durable agents\n\nA short draft."

# One valid input per demo agent, as the engine would build it from run state.
SAMPLE_INPUTS: dict[type[Agent], dict[str, Any]] = {
    content.Classifier: {"topic": "Durable workflow engines for agent systems"},
    content.Researcher: {"topic": "Durable agents", "keywords": ["durable"], "angle": "examples"},
    content.Writer: {"topic": "Durable agents", "background": ["b1"], "examples": ["e1"]},
    content.Reviewer: {"draft": DRAFT, "revision": 1},
    content.Publisher: {"topic": "Durable agents", "draft": DRAFT, "category": "engineering"},
    refunds.TriageRouter: {"message": "My chair arrived broken, I want a refund"},
    refunds.OrderLookup: {"order_id": "ord_1", "customer_id": "cus_1"},
    refunds.RefundProposer: {"order": ORDER, "message": "It arrived damaged"},
    refunds.RefundExecutor: {"proposal": PROPOSAL},
    refunds.RefundReverser: {
        "step": "execute_refund",
        "input": {"proposal": PROPOSAL},
        "output": {
            "refund_id": "re_1",
            "amount": 150.0,
            "currency": "EUR",
            "status": "pending_settlement",
        },
        "reason": "settlement: no 'payment.settled' event before the deadline",
    },
    refunds.QuestionAnswerer: {"message": "When will my order ship?", "order_id": "ord_1"},
    refunds.CustomerNotifier: {"customer_id": "cus_1", "refund_id": "re_1", "refund_amount": 150},
    research.Planner: {"question": "How do teams run agents in production?"},
    research.SubquestionWorker: {"index": 0, "question": "What does it cost?"},
    research.Merger: {
        "question": "Q?",
        "answers": [
            {"index": 1, "question": "B?", "answer": "b"},
            {"index": 0, "question": "A?", "answer": "a"},
        ],
    },
    noop.NoopAgent: {"anything": [1, 2, 3]},
}
# Agents that simulate a model call report tokens; lookups, payments and sends do not.
MODEL_BACKED_AGENTS = [
    content.Classifier,
    content.Researcher,
    content.Writer,
    content.Reviewer,
    refunds.TriageRouter,
    refunds.RefundProposer,
    refunds.QuestionAnswerer,
    research.Planner,
    research.SubquestionWorker,
    research.Merger,
]
WORKFLOWS = [content_pipeline, refund_desk, research_brief, reference_workload]


class NoSleepClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        pass


class RegistryTools:
    """An agent's tool calls outside the engine: the real tool client and the registered
    capabilities, with rate limits and circuits kept in memory and backoffs not slept."""

    def __init__(self, seed: int) -> None:
        self.client = ToolClient(
            clock=NoSleepClock(),
            rng=random.Random(seed),
            limiter=RateLimiter(MemoryBackend()),
            breaker=CircuitBreaker(MemoryBackend()),
        )
        self.calls = 0

    def call(self, capability: str, params: BaseModel | dict[str, Any]) -> BaseModel:
        self.calls += 1
        return self.client.call(capability, params, run_id=0, node="test", call_index=self.calls)


def run_agent(
    agent_class: type[Agent], fields: Mapping[str, Any], *, seed: int = 0, attempt: int = 2
):
    """Run an agent as the engine would; attempt 2 by default so no simulated failure interferes."""
    agent = agent_class()
    ctx = AgentContext.for_test(seed=seed, attempt=attempt)
    ctx.tools = RegistryTools(seed)
    output = agent.run(agent.Input.model_validate(fields), ctx)
    assert isinstance(output, agent_class.Output)
    return output, ctx


def agent_ids(agent_class: type[Agent]) -> str:
    return agent_class.name


# --- agents -------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent_class", list(SAMPLE_INPUTS), ids=agent_ids)
def test_agent_returns_a_valid_output(agent_class: type[Agent]) -> None:
    output, _ = run_agent(agent_class, SAMPLE_INPUTS[agent_class])

    agent_class.Output.model_validate(output.model_dump())


@pytest.mark.parametrize("agent_class", list(SAMPLE_INPUTS), ids=agent_ids)
def test_agent_output_is_deterministic_for_a_seed(agent_class: type[Agent]) -> None:
    first, first_ctx = run_agent(agent_class, SAMPLE_INPUTS[agent_class], seed=7)
    again, again_ctx = run_agent(agent_class, SAMPLE_INPUTS[agent_class], seed=7)

    assert first == again
    assert first_ctx.usage == again_ctx.usage


@pytest.mark.parametrize(
    "agent_class",
    [
        content.Classifier,
        content.Researcher,
        content.Writer,
        content.Reviewer,
        refunds.RefundExecutor,
        refunds.QuestionAnswerer,
        research.Planner,
        research.SubquestionWorker,
    ],
    ids=agent_ids,
)
def test_agent_output_varies_across_seeds(agent_class: type[Agent]) -> None:
    outputs = {
        run_agent(agent_class, SAMPLE_INPUTS[agent_class], seed=seed)[0].model_dump_json()
        for seed in range(10)
    }

    assert len(outputs) > 1


@pytest.mark.parametrize(
    "agent_class", [cls for cls in SAMPLE_INPUTS if cls is not noop.NoopAgent], ids=agent_ids
)
def test_agent_fails_transiently_only_on_first_attempts(agent_class: type[Agent]) -> None:
    failed_seeds = []
    for seed in range(200):
        try:
            run_agent(agent_class, SAMPLE_INPUTS[agent_class], seed=seed, attempt=1)
        except TransientError:
            failed_seeds.append(seed)

    # About 5% of first attempts fail; every retry of those succeeds.
    assert 1 <= len(failed_seeds) <= 30
    for seed in failed_seeds:
        run_agent(agent_class, SAMPLE_INPUTS[agent_class], seed=seed, attempt=2)


@pytest.mark.parametrize("agent_class", MODEL_BACKED_AGENTS, ids=agent_ids)
def test_model_backed_agents_report_usage(agent_class: type[Agent]) -> None:
    _, ctx = run_agent(agent_class, SAMPLE_INPUTS[agent_class])

    assert ctx.usage.prompt_tokens > 0
    assert ctx.usage.completion_tokens > 0
    assert ctx.usage.cost_usd > 0
    assert ctx.usage.model == "demo-model"


def test_agents_spend_realistic_time_through_the_context() -> None:
    slept: list[float] = []
    ctx = AgentContext.for_test(attempt=2)
    ctx.time_scale = 1.0
    ctx.sleep = slept.append
    agent = content.Writer()

    agent.run(agent.Input.model_validate(SAMPLE_INPUTS[content.Writer]), ctx)

    assert len(slept) == 1
    assert 0.2 <= slept[0] <= 1.5


def test_planner_returns_two_to_six_indexed_subquestions() -> None:
    counts = set()
    for seed in range(50):
        output, _ = run_agent(research.Planner, SAMPLE_INPUTS[research.Planner], seed=seed)
        items = output.subquestions
        counts.add(len(items))
        assert 2 <= len(items) <= 6
        assert [item["index"] for item in items] == list(range(len(items)))
        for item in items:
            research.SubquestionWorker.Input.model_validate(item)

    assert len(counts) > 1


def test_planner_respects_max_subquestions() -> None:
    for seed in range(20):
        output, _ = run_agent(
            research.Planner, {"question": "Why?", "max_subquestions": 2}, seed=seed
        )
        assert len(output.subquestions) == 2


def test_merger_orders_answers_by_index() -> None:
    output, _ = run_agent(research.Merger, SAMPLE_INPUTS[research.Merger])

    assert output.brief.index("A?") < output.brief.index("B?")
    assert output.sections == 2


@pytest.mark.parametrize(
    ("message", "route"),
    [
        ("My chair arrived broken, I want a refund", "refund"),
        ("I was charged twice for one order", "refund"),
        ("When will my order ship?", "question"),
    ],
)
def test_triage_routes_refund_requests_and_questions(message: str, route: str) -> None:
    output, _ = run_agent(refunds.TriageRouter, {"message": message})

    assert output.route == route
    assert output.route in refund_desk.node("triage").routes


def test_order_lookup_returns_the_same_order_for_an_id_whatever_the_seed() -> None:
    fields = {"order_id": "ord_1", "customer_id": "cus_1"}
    orders = {
        run_agent(refunds.OrderLookup, fields, seed=seed)[0].model_dump_json() for seed in range(10)
    }
    assert len(orders) == 1
    other = run_agent(refunds.OrderLookup, {**fields, "order_id": "ord_2"})[0]
    assert other.model_dump_json() not in orders


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [
        ("small", 0, 100),
        ("consumer", 100, 1_000),
        ("business", 1_000, 10_000),
        ("enterprise", 10_000, 1e9),
    ],
)
def test_orders_of_each_kind_need_that_refund_tier(
    kind: orders.OrderKind, low: float, high: float
) -> None:
    rng = random.Random(1)
    for _ in range(20):
        order_id = orders.order_id_of_kind(kind, rng)
        order, _ = run_agent(refunds.OrderLookup, {"order_id": order_id, "customer_id": "cus_1"})
        proposal, _ = run_agent(
            refunds.RefundProposer, {"order": order.order, "message": "It arrived damaged"}
        )
        assert low < proposal.proposal["amount"] <= high


def test_archived_orders_time_out_on_every_attempt() -> None:
    order_id = orders.order_id_of_kind("archived", random.Random(1))
    for attempt in (1, 2, 3, 4):
        with pytest.raises(TransientError, match="provider_timeout"):
            run_agent(
                refunds.OrderLookup, {"order_id": order_id, "customer_id": "cus_1"}, attempt=attempt
            )


def test_marketplace_orders_break_the_proposers_input_contract() -> None:
    order_id = orders.order_id_of_kind("marketplace", random.Random(1))
    order, _ = run_agent(refunds.OrderLookup, {"order_id": order_id, "customer_id": "cus_1"})
    assert order.order["currency"] is None
    with pytest.raises(ValidationError, match="currency"):
        refunds.RefundProposer.Input.model_validate({"order": order.order, "message": "damaged"})


def test_refund_id_is_the_same_on_every_attempt() -> None:
    first, _ = run_agent(refunds.RefundExecutor, {"proposal": PROPOSAL}, attempt=2)
    retried, _ = run_agent(refunds.RefundExecutor, {"proposal": PROPOSAL}, attempt=3)

    assert first.refund_id == retried.refund_id
    assert first.refund_id.startswith("re_")


def test_refund_proposal_follows_the_reason() -> None:
    damaged, _ = run_agent(refunds.RefundProposer, {"order": ORDER, "message": "it is damaged"})
    late, _ = run_agent(refunds.RefundProposer, {"order": ORDER, "message": "it came late"})

    assert damaged.proposal["amount"] == 150.0
    assert late.proposal["amount"] == 30.0


def test_reviewer_approves_later_revisions_more_often() -> None:
    def approvals(revision: int) -> int:
        return sum(
            run_agent(content.Reviewer, {"draft": DRAFT, "revision": revision}, seed=s)[0].approved
            for s in range(200)
        )

    assert approvals(1) < approvals(2) < approvals(3)
    assert 0 < approvals(1) < 200


def test_noop_agent_returns_a_fixed_size_payload_for_any_input() -> None:
    output, ctx = run_agent(noop.NoopAgent, {"a": 1, "b": {"nested": True}})

    assert len(output.payload) == 200
    assert len(output.model_dump_json()) < 300
    # Priced so that a policy with ceilings exercises the ledger on the benchmark's steps.
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (120, 50)
    assert noop.NoopAgent.model == "demo-model"


def test_noop_agent_never_fails_on_a_first_attempt() -> None:
    for seed in range(100):
        run_agent(noop.NoopAgent, {}, seed=seed, attempt=1)


# --- registry and workflows -------------------------------------------------------------------


def import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(import_module(module_name), attr)


@pytest.mark.parametrize("name", sorted(BUILTIN_AGENTS))
def test_builtin_agent_path_names_an_agent_with_that_name(name: str) -> None:
    agent_class = import_path(BUILTIN_AGENTS[name])

    assert issubclass(agent_class, Agent)
    assert agent_class.name == name
    assert agent_class.capability
    assert issubclass(agent_class.Input, BaseModel)
    assert issubclass(agent_class.Output, BaseModel)


def test_demo_agents_use_two_pools() -> None:
    pools = {import_path(path).pool for path in BUILTIN_AGENTS.values()}

    assert pools == {"default", "research"}


@pytest.mark.parametrize("path", BUILTIN_WORKFLOWS)
def test_builtin_workflow_seals_and_describes_every_node(path: str) -> None:
    wf: Workflow = import_path(path).seal()
    described = wf.describe()

    assert wf.version == 1
    assert described["description"]
    assert [node["name"] for node in described["nodes"]] == list(wf.nodes)
    assert len(wf.start_nodes()) == 1
    wf.input.model_validate({})
    for node in wf.nodes.values():
        if node.agent:
            assert node.agent in BUILTIN_AGENTS


def test_content_pipeline_shape() -> None:
    wf = content_pipeline.seal()

    assert wf.start_nodes() == ["classify"]
    assert set(wf.successors("classify")) == {"research_a", "research_b"}
    assert wf.node("draft").after == ("research_a", "research_b")
    assert set(wf.successors("review_gate")) == {"draft", "publish"}
    assert wf.node("review_gate").loop_limit == 3
    assert wf.node("publish").approval is not None


def test_refund_desk_shape() -> None:
    wf = refund_desk.seal()

    assert wf.node("triage").routes == {"refund": "lookup_order", "question": "answer_question"}
    assert wf.successors("execute_refund") == ("settlement",)
    assert wf.node("settlement").on_timeout == FAIL
    assert wf.node("notify_customer").join_needed() == 1


def test_refund_approval_is_needed_above_the_threshold_only() -> None:
    approval = refund_desk.node("execute_refund").approval

    assert approval.required({"proposal": {"amount": 100.01}})
    assert not approval.required({"proposal": {"amount": 100}})
    assert refund_needs_approval({})  # an unknown amount fails closed


def test_reference_workload_approval_follows_the_input() -> None:
    approval = reference_workload.node("publish").approval

    assert not approval.required(reference_workload.input().model_dump())
    assert approval.required({"needs_approval": True})


# --- the workflows' data flow, walked the way the engine maps state ---------------------------


def visible(state: Mapping[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {key: state[key] for key in keys if key in state}


def execute_node(wf: Workflow, name: str, state: dict[str, Any], seed: int) -> BaseModel:
    """Build a node's input from state, run its agent (on a retry-safe attempt), write its output."""
    node = wf.node(name)
    agent_class = import_path(BUILTIN_AGENTS[node.agent])
    shown = visible(state, node.reads)
    fields = node.input(shown) if node.input else shown
    ctx = AgentContext.for_test(shown, writes=node.writes, seed=seed, attempt=2, step_key=name)
    ctx.tools = RegistryTools(seed)
    output = agent_class().run(agent_class.Input.model_validate(fields), ctx)
    dumped = agent_class.Output.model_validate(output.model_dump()).model_dump(mode="json")
    state.update({key: value for key, value in dumped.items() if key in node.writes})
    return output


def choose(wf: Workflow, name: str, state: Mapping[str, Any]) -> str:
    node = wf.node(name)
    return node.choose(visible(state, node.reads))


@pytest.mark.parametrize("seed", range(5))
def test_content_pipeline_data_flows_from_topic_to_published_url(seed: int) -> None:
    wf = content_pipeline
    state = wf.input().model_dump()
    for name in ("classify", "research_a", "research_b"):
        execute_node(wf, name, state, seed)
    for _ in range(wf.node("review_gate").loop_limit):
        execute_node(wf, "draft", state, seed + state.get("revision", 0))
        execute_node(wf, "review", state, seed + state["revision"])
        if choose(wf, "review_gate", state) == "publish":
            break
    execute_node(wf, "publish", state, seed)

    assert state["background"] and state["examples"]
    assert state["published_url"].startswith("https://")
    assert 1 <= state["revision"] <= 3


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (
            "My chair arrived damaged, refund please",
            ["lookup_order", "propose_refund", "execute_refund"],
        ),
        ("Do you ship to Norway?", ["answer_question"]),
    ],
)
def test_refund_desk_data_flows_on_both_routes(message: str, path: list[str]) -> None:
    wf = refund_desk
    state = wf.input(message=message).model_dump()
    triage = execute_node(wf, "triage", state, seed=1)
    assert wf.node("triage").routes[triage.route] == path[0]
    for name in path:
        execute_node(wf, name, state, seed=1)
    if "execute_refund" in path:
        state["settlement"] = {"refund_id": state["refund_id"], "status": "settled"}

    notification = execute_node(wf, "notify_customer", state, seed=1)

    assert state["notification_id"].startswith("ntf_")
    if "execute_refund" in path:
        assert state["refund_id"] in notification.body
    else:
        assert notification.body == state["answer"]


@pytest.mark.parametrize("seed", range(5))
def test_research_brief_maps_each_subquestion_and_merges_in_order(seed: int) -> None:
    wf = research_brief
    state = wf.input().model_dump()
    execute_node(wf, "plan", state, seed)
    answer_node = wf.node("answer")
    items = state[answer_node.items]
    assert len(items) <= answer_node.max_items
    worker = import_path(BUILTIN_AGENTS[answer_node.agent])
    outputs = [run_agent(worker, item, seed=seed)[0].model_dump(mode="json") for item in items]
    (answers_key,) = answer_node.writes
    state[answers_key] = outputs

    merged = execute_node(wf, "merge", state, seed)

    assert merged.sections == len(items)
    assert state["brief"].startswith("# Brief:")


def test_route_targets_are_nodes_or_terminals() -> None:
    for wf in WORKFLOWS:
        for node in wf.nodes.values():
            for target in node.targets:
                assert target in wf.nodes or target in (END, FAIL)
