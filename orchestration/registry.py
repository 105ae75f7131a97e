"""Explicit registries: agent name -> dotted path, workflow list -> dotted paths.

Entries are imported lazily on first use; an unknown name is an error, never a silent default.
Settings add entries (``SIGNALBOX_AGENTS`` / ``SIGNALBOX_WORKFLOWS``) so a deployment, or the
test suite, can register its own without editing this file.
"""

from __future__ import annotations

import threading
from functools import cache
from importlib import import_module
from typing import Any

from django.conf import settings

from orchestration.agents.base import Agent
from orchestration.definition import Workflow
from orchestration.errors import UnknownAgent, UnknownWorkflow

BUILTIN_AGENTS: dict[str, str] = {
    # content pipeline
    "classifier": "orchestration.agents.demo.content:Classifier",
    "researcher": "orchestration.agents.demo.content:Researcher",
    "writer": "orchestration.agents.demo.content:Writer",
    "reviewer": "orchestration.agents.demo.content:Reviewer",
    "publisher": "orchestration.agents.demo.content:Publisher",
    # refund desk
    "triage_router": "orchestration.agents.demo.refunds:TriageRouter",
    "order_lookup": "orchestration.agents.demo.refunds:OrderLookup",
    "refund_proposer": "orchestration.agents.demo.refunds:RefundProposer",
    "refund_executor": "orchestration.agents.demo.refunds:RefundExecutor",
    "refund_reverser": "orchestration.agents.demo.refunds:RefundReverser",
    "question_answerer": "orchestration.agents.demo.refunds:QuestionAnswerer",
    "customer_notifier": "orchestration.agents.demo.refunds:CustomerNotifier",
    # research brief
    "planner": "orchestration.agents.demo.research:Planner",
    "subquestion_worker": "orchestration.agents.demo.research:SubquestionWorker",
    "merger": "orchestration.agents.demo.research:Merger",
    # benchmark reference workload: agents that do no work
    "noop": "orchestration.agents.demo.noop:NoopAgent",
    # any OpenAI-compatible chat-completions endpoint
    "llm_chat": "orchestration.agents.openai_compat:ChatCompletionAgent",
    # escalation drills: fails at once, so the run escalates
    "drill_alarm": "orchestration.agents.drill:DrillAlarm",
}

BUILTIN_WORKFLOWS: list[str] = [
    "orchestration.workflows.content:content_pipeline",
    "orchestration.workflows.refunds:refund_desk",
    "orchestration.workflows.research:research_brief",
    "orchestration.workflows.reference:reference_workload",
    "orchestration.workflows.drill:drill",
]

_lock = threading.Lock()


def _import(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(import_module(module_name), attr)


def agent_paths() -> dict[str, str]:
    return {**BUILTIN_AGENTS, **getattr(settings, "SIGNALBOX_AGENTS", {})}


@cache
def agent_class(name: str) -> type[Agent]:
    path = agent_paths().get(name)
    if path is None:
        raise UnknownAgent(f"no agent is registered as {name!r}", detail={"agent": name})
    cls = _import(path)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise UnknownAgent(f"{path} is not an Agent subclass", detail={"agent": name})
    return cls


def agent_instance(name: str) -> Agent:
    return _agent_instance(name)


@cache
def _agent_instance(name: str) -> Agent:
    # Agents are stateless between calls, so one instance per process serves every step.
    return agent_class(name)()


@cache
def _workflows() -> dict[tuple[str, int], Workflow]:
    with _lock:
        found: dict[tuple[str, int], Workflow] = {}
        paths = [*BUILTIN_WORKFLOWS, *getattr(settings, "SIGNALBOX_WORKFLOWS", [])]
        for path in paths:
            wf = _import(path).seal()
            for node in wf.nodes.values():
                # Fallback and compensating agents must exist: an import error, not a run failure.
                for name in (node.fallback, node.compensate):
                    if name:
                        agent_class(name)
            found[(wf.name, wf.version)] = wf
        return found


def workflow_get(name: str, version: int | None = None) -> Workflow:
    """The workflow ``name`` at ``version`` (default: the highest registered version)."""
    registered = _workflows()
    if version is None:
        versions = [v for (n, v) in registered if n == name]
        if not versions:
            raise UnknownWorkflow(
                f"no workflow is registered as {name!r}", detail={"workflow": name}
            )
        version = max(versions)
    wf = registered.get((name, version))
    if wf is None:
        raise UnknownWorkflow(
            f"no workflow is registered as {name!r} version {version}",
            detail={"workflow": name, "version": version},
        )
    return wf


def workflow_list() -> list[Workflow]:
    return sorted(_workflows().values(), key=lambda wf: (wf.name, wf.version))


def pools() -> list[str]:
    """Every worker pool some registered workflow uses, for starting a worker for all of them."""
    found = {"default"}
    for wf in workflow_list():
        for node in wf.nodes.values():
            for name in (node.agent, node.fallback, node.compensate):
                if name:
                    found.add(node.pool or agent_class(name).pool)
    return sorted(found)
