"""What a step would execute and what it must produce, derived from the definition and the
run's state alone."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from infra.canonical import digest
from orchestration import compensation
from orchestration.agents.base import StateView
from orchestration.definition import Node, Workflow
from orchestration.models import (
    Run,
    Step,
    StepKind,
    ToolCall,
)
from orchestration.registry import agent_class


def node_of(wf: Workflow, step: Step) -> Node:
    """The workflow node a step activates (a compensation step: the node it undoes)."""
    if step.kind == StepKind.COMPENSATE:
        return wf.node(compensation.undone_node(step.node))
    return wf.node(step.node)


def output_contract(step: Step, node: Node) -> type[BaseModel]:
    """What a step's output must satisfy: the node's agent's contract (a fallback agent, an
    operator's skip value and a degraded result are held to it too); a compensation's own."""
    if step.kind == StepKind.COMPENSATE:
        return agent_class(step.agent).Output
    return agent_class(node.agent).Output


def step_input(step: Step, node: Node, run: Run) -> Any:
    """The agent input a step would get now: its item, an operator's edit, or declared state."""
    if step.kind in (StepKind.ITEM, StepKind.COMPENSATE):
        return step.input
    if step.input_override is not None:
        return step.input_override
    return node_input(node, run)


def node_input(node: Node, run: Run) -> dict[str, Any]:
    """The input an agent node's step gets from the run's state (its declared reads, or its
    ``input`` function over them)."""
    view = StateView(run.state, reads=node.reads, writes=frozenset())
    if node.input is not None:
        return dict(node.input(view))
    return {key: run.state[key] for key in sorted(node.reads) if key in run.state}


def step_action(step: Step, node: Node, run: Run) -> dict[str, Any]:
    """The exact action a step would execute: what an approval is bound to."""
    return {
        "agent": node.agent,
        "node": node.name,
        "input": step_input(step, node, run),
        "state_versions": {k: run.state_versions.get(k, 0) for k in sorted(node.reads)},
    }


def approval_digest(action: dict[str, Any], policy_version: int | None) -> str:
    """What an approval is bound to: the exact action and the policy version in force when it
    was asked for (none: no policy). A step executes only while both are still the same; a new
    policy version in between asks again, as a changed action does."""
    if policy_version is None:
        return digest(action)
    return digest({"action": action, "policy_version": policy_version})


def tool_call_summary(call: ToolCall) -> dict[str, Any]:
    return {
        "capability": call.capability,
        "provider": call.provider,
        "attempt": call.attempt,
        "status": call.status,
        "error_code": call.error_code,
        "error_message": call.error_message[:300],
        "latency_ms": call.latency_ms,
        "idempotency_key": call.idempotency_key,
        "at": call.created_at.isoformat() if call.created_at else None,
    }
