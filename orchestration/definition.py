"""Code-first workflow definitions: a small graph API the engine executes and the console draws.

A workflow is a set of named nodes joined by edges:

* ``after=`` edges: ``wf.agent("draft", ..., after=["research_a", "research_b"], join="all")``.
  Several nodes after the same node run in parallel; a node after several nodes is a join
  (``"all"``, ``"any"`` or an integer N for "first N").
* route edges: a route node (deterministic function of state) or a routing agent (its output
  field names the path) activates exactly one of its declared targets; a target earlier in the
  graph makes a loop, bounded by ``loop_limit``.

Node kinds: ``agent`` (executed by a worker), ``route`` (evaluated inside advance), ``map``
(dynamic fan-out: one agent step per item of a list in state, bounded and joined in order) and
``wait`` (pause until a named outside event, with a timeout). Approval gates are declared on the
agent node whose action they guard (``approval=Approval(...)``) because an approval is bound to
the exact action it approves.

Recovery is declared per agent (and map) node, with workflow-wide defaults. When an attempt
fails, the tiers are tried in order:

1. a transient failure is retried with backoff and full jitter, within ``max_attempts`` and
   ``retry_within`` (tool calls inside the attempt have already tried every provider);
2. then the node's ``fallback`` agent gets the step (with its own attempts);
3. then a declared ``degraded`` result lets the run go on, marked degraded;
4. otherwise the step escalates to an operator (``on_failure="escalate"``, the default), who
   retries it, skips it with a value, or aborts the run; ``on_failure="fail"`` fails the run.

A node with an outside side effect declares ``compensate=`` (an agent); when the run fails or is
cancelled later, the compensations of its completed steps run in reverse order. ``timeout``
(soft: the agent is interrupted and the attempt fails as transient) and ``hard_timeout`` (the
attempt is fenced off even if the agent never returns) bound each attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol

from pydantic import BaseModel

END = "__end__"
FAIL = "__fail__"

JoinMode = Literal["all", "any"] | int
TimeoutOutcome = Literal["reject", "approve", "fail", "continue"] | str
OnFailure = Literal["escalate", "fail"]


class StateReader(Protocol):
    """What a node's ``input`` and ``choose`` functions are given: the run state as the node sees it.

    The engine passes an ``orchestration.agents.base.StateView``: reading a key the node did not
    declare raises ``StateAccessDenied``, and it cannot be iterated. A plain dict also fits."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True)
class Approval:
    """A human decision required before an agent node's action executes.

    ``when`` (a function of the run state) makes it conditional, e.g. refunds above an amount.
    On expiry the ``on_timeout`` outcome applies; the default fails closed (reject).
    """

    tier: int = 1
    #: How many distinct people must approve.
    quorum: int = 1
    timeout: timedelta = timedelta(hours=24)
    on_timeout: Literal["reject", "approve"] = "reject"
    when: Callable[[Mapping[str, Any]], bool] | None = None
    reason: str = "approval required"

    def required(self, state: Mapping[str, Any]) -> bool:
        return True if self.when is None else bool(self.when(state))


@dataclass(frozen=True)
class Failure:
    """What a ``Degraded`` function is given: how the step finally failed."""

    step_key: str
    agent: str
    code: str
    message: str
    error_class: str
    attempts: int
    agents_tried: tuple[str, ...]
    #: The input the failing agent was given (a map item's element, say), if it got that far.
    input: Any = None


@dataclass(frozen=True)
class Degraded:
    """A result the run may continue with when a node's agent (and its fallback) failed.

    ``output`` is a mapping or a function of the :class:`Failure`; it must satisfy the node's
    output contract. ``reason`` is what operators see on the run ("no sources: summary only")."""

    output: Mapping[str, Any] | Callable[[Failure], Mapping[str, Any]]
    reason: str = "degraded result"

    def value(self, failure: Failure) -> dict[str, Any]:
        return dict(self.output(failure) if callable(self.output) else self.output)


@dataclass
class Node:
    name: str
    kind: Literal["agent", "route", "map", "wait"]
    after: tuple[str, ...] = ()
    join: JoinMode = "all"
    agent: str = ""
    pool: str = ""
    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    #: Builds the agent input from the visible state; default: the read keys themselves.
    input: Callable[[StateReader], Mapping[str, Any]] | None = None
    max_attempts: int | None = None
    approval: Approval | None = None
    # recovery (agent and map nodes)
    fallback: str = ""
    degraded: Degraded | None = None
    on_failure: OnFailure | None = None
    compensate: str = ""
    retry_within: timedelta | None = None
    timeout: timedelta | None = None
    hard_timeout: timedelta | None = None
    escalation_timeout: timedelta | None = None
    # route / routing agent
    targets: tuple[str, ...] = ()
    choose: Callable[[StateReader], str] | None = None
    routes: Mapping[str, str] = field(default_factory=dict)
    route_field: str = "route"
    loop_limit: int | None = None
    on_loop_limit: str = FAIL
    # map (dynamic fan-out)
    items: str = ""
    max_items: int = 0
    concurrency: int = 0
    # wait for an outside event
    event: str = ""
    wait_timeout: timedelta | None = None
    on_timeout: str = FAIL

    @property
    def is_join(self) -> bool:
        return len(self.after) > 1

    def join_needed(self) -> int:
        """How many of the ``after`` predecessors must arrive before this node is released."""
        if self.join == "all":
            return len(self.after)
        if self.join == "any":
            return 1
        return int(self.join)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for the API and the console's drawing."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "after": list(self.after)}
        if self.is_join:
            out["join"] = self.join
        if self.agent:
            out["agent"] = self.agent
        if self.reads:
            out["reads"] = sorted(self.reads)
        if self.writes:
            out["writes"] = sorted(self.writes)
        if self.approval:
            out["approval"] = {
                "tier": self.approval.tier,
                "timeout_seconds": int(self.approval.timeout.total_seconds()),
                "on_timeout": self.approval.on_timeout,
                "conditional": self.approval.when is not None,
            }
        if self.targets:
            out["targets"] = list(self.targets)
        if self.routes:
            out["routes"] = dict(self.routes)
        if self.loop_limit:
            out["loop_limit"] = self.loop_limit
            out["on_loop_limit"] = self.on_loop_limit
        if self.kind == "map":
            out.update(items=self.items, max_items=self.max_items, concurrency=self.concurrency)
        if self.kind in ("agent", "map"):
            recovery: dict[str, Any] = {}
            if self.fallback:
                recovery["fallback"] = self.fallback
            if self.degraded is not None:
                recovery["degraded"] = self.degraded.reason
            if self.compensate:
                recovery["compensate"] = self.compensate
            if self.on_failure:
                recovery["on_failure"] = self.on_failure
            for name in ("retry_within", "timeout", "hard_timeout", "escalation_timeout"):
                value = getattr(self, name)
                if value is not None:
                    recovery[f"{name}_seconds"] = value.total_seconds()
            if recovery:
                out["recovery"] = recovery
        if self.kind == "wait":
            out.update(
                event=self.event,
                timeout_seconds=int(self.wait_timeout.total_seconds())
                if self.wait_timeout
                else None,
                on_timeout=self.on_timeout,
            )
        return out


class DefinitionError(ValueError):
    """The workflow definition is not well formed (raised at import time, not at run time)."""


class Workflow:
    """A named, versioned workflow graph. Build it with the methods below, then ``seal()``."""

    def __init__(
        self,
        name: str,
        *,
        version: int = 1,
        input: type[BaseModel],
        description: str = "",
        max_steps: int = 100,
        max_duration: timedelta = timedelta(hours=24),
        default_max_attempts: int = 3,
        on_failure: OnFailure = "escalate",
        retry_within: timedelta = timedelta(hours=1),
        step_timeout: timedelta = timedelta(minutes=10),
        step_hard_timeout: timedelta | None = None,
        escalation_timeout: timedelta = timedelta(hours=24),
    ):
        """``on_failure`` and the timeouts are the defaults of every agent and map node:
        a step that exhausted its recovery escalates to an operator (or fails the run), each
        attempt is interrupted after ``step_timeout`` and fenced off after ``step_hard_timeout``
        (default: the soft timeout plus a minute), retries stop after ``retry_within``, and an
        unanswered escalation fails the run after ``escalation_timeout``."""
        if on_failure not in ("escalate", "fail"):
            raise DefinitionError(f"{name}: on_failure must be 'escalate' or 'fail'")
        self.name = name
        self.version = version
        self.input = input
        self.description = description
        self.max_steps = max_steps
        self.max_duration = max_duration
        self.default_max_attempts = default_max_attempts
        self.on_failure: OnFailure = on_failure
        self.retry_within = retry_within
        self.step_timeout = step_timeout
        self.step_hard_timeout = step_hard_timeout or step_timeout + timedelta(minutes=1)
        self.escalation_timeout = escalation_timeout
        self.nodes: dict[str, Node] = {}
        self._successors: dict[str, tuple[str, ...]] = {}
        self._sealed = False

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    # --- building -------------------------------------------------------------------------------

    def _add(self, node: Node) -> Node:
        if self._sealed:
            raise DefinitionError(f"{self.key} is sealed; nodes cannot be added")
        if node.name in self.nodes or node.name in (END, FAIL):
            raise DefinitionError(f"{self.key}: duplicate or reserved node name {node.name!r}")
        self.nodes[node.name] = node
        return node

    def agent(
        self,
        name: str,
        agent: str,
        *,
        after: str | Iterable[str] = (),
        join: JoinMode = "all",
        reads: Iterable[str] = (),
        writes: Iterable[str] = (),
        input: Callable[[StateReader], Mapping[str, Any]] | None = None,
        pool: str = "",
        max_attempts: int | None = None,
        approval: Approval | None = None,
        routes: Mapping[str, str] | None = None,
        route_field: str = "route",
        fallback: str = "",
        degraded: Degraded | None = None,
        on_failure: OnFailure | None = None,
        compensate: str = "",
        retry_within: timedelta | None = None,
        timeout: timedelta | None = None,
        hard_timeout: timedelta | None = None,
        escalation_timeout: timedelta | None = None,
    ) -> Node:
        """An agent step. With ``routes``, the agent is a routing agent: its output field
        ``route_field`` picks the one successor that runs. The recovery arguments are described
        in this module's docstring; unset ones take the workflow's defaults."""
        return self._add(
            Node(
                name=name,
                kind="agent",
                after=_names(after),
                join=join,
                agent=agent,
                pool=pool,
                reads=frozenset(reads),
                writes=frozenset(writes),
                input=input,
                max_attempts=max_attempts,
                approval=approval,
                routes=dict(routes or {}),
                route_field=route_field,
                targets=tuple(dict.fromkeys((routes or {}).values())),
                fallback=fallback,
                degraded=degraded,
                on_failure=on_failure,
                compensate=compensate,
                retry_within=retry_within,
                timeout=timeout,
                hard_timeout=hard_timeout,
                escalation_timeout=escalation_timeout,
            )
        )

    def route(
        self,
        name: str,
        *,
        after: str | Iterable[str],
        choose: Callable[[StateReader], str],
        targets: Iterable[str],
        reads: Iterable[str] = (),
        join: JoinMode = "all",
        loop_limit: int | None = None,
        on_loop_limit: str = FAIL,
    ) -> Node:
        """A deterministic branch: ``choose(state)`` returns one of ``targets`` (or ``END``).

        A target that already ran makes a loop; it may run at most ``loop_limit`` times, after
        which ``on_loop_limit`` (a node name, ``END`` or ``FAIL``) is taken instead."""
        return self._add(
            Node(
                name=name,
                kind="route",
                after=_names(after),
                join=join,
                choose=choose,
                targets=tuple(targets),
                reads=frozenset(reads),
                loop_limit=loop_limit,
                on_loop_limit=on_loop_limit,
            )
        )

    def map(
        self,
        name: str,
        agent: str,
        *,
        after: str | Iterable[str],
        items: str,
        max_items: int,
        concurrency: int = 4,
        writes: Iterable[str] = (),
        reads: Iterable[str] = (),
        pool: str = "",
        max_attempts: int | None = None,
        fallback: str = "",
        degraded: Degraded | None = None,
        on_failure: OnFailure | None = None,
        compensate: str = "",
        retry_within: timedelta | None = None,
        timeout: timedelta | None = None,
        hard_timeout: timedelta | None = None,
        escalation_timeout: timedelta | None = None,
    ) -> Node:
        """Dynamic fan-out: one ``agent`` step per element of the list in state key ``items``.

        More than ``max_items`` elements fails the node with a limit error; at most
        ``concurrency`` items run at once; the outputs are written, in item order, as a list to
        the single key in ``writes``."""
        writes = frozenset(writes)
        if len(writes) != 1:
            raise DefinitionError(f"map node {name!r} must declare exactly one key in writes")
        if max_items < 1 or concurrency < 1:
            raise DefinitionError(f"map node {name!r}: max_items and concurrency must be >= 1")
        return self._add(
            Node(
                name=name,
                kind="map",
                after=_names(after),
                agent=agent,
                pool=pool,
                items=items,
                reads=frozenset(reads) | {items},
                writes=writes,
                max_items=max_items,
                concurrency=concurrency,
                max_attempts=max_attempts,
                fallback=fallback,
                degraded=degraded,
                on_failure=on_failure,
                compensate=compensate,
                retry_within=retry_within,
                timeout=timeout,
                hard_timeout=hard_timeout,
                escalation_timeout=escalation_timeout,
            )
        )

    def wait(
        self,
        name: str,
        *,
        event: str,
        after: str | Iterable[str],
        timeout: timedelta,
        on_timeout: str = FAIL,
        writes: Iterable[str] = (),
    ) -> Node:
        """Pause until the outside event ``event`` is sent to the run (applied once), or until
        ``timeout``, when ``on_timeout`` is taken: a node name, ``END`` (continue to the end),
        ``"continue"`` (go on to the successors) or ``FAIL`` (the default)."""
        writes = frozenset(writes)
        if len(writes) > 1:
            raise DefinitionError(f"wait node {name!r} writes at most one key (the event payload)")
        return self._add(
            Node(
                name=name,
                kind="wait",
                after=_names(after),
                event=event,
                wait_timeout=timeout,
                on_timeout=on_timeout,
                writes=writes,
            )
        )

    # --- reading --------------------------------------------------------------------------------

    def seal(self) -> Workflow:
        """Check the graph and freeze it. Called by the registry; errors here are import errors."""
        if self._sealed:
            return self
        targeted: set[str] = set()
        succ: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for pred in node.after:
                if pred not in self.nodes:
                    raise DefinitionError(f"{self.key}: {node.name!r} is after unknown {pred!r}")
                succ[pred].append(node.name)
            if node.kind == "route" and not node.targets:
                raise DefinitionError(f"{self.key}: route {node.name!r} has no targets")
            for target in (*node.targets, node.on_loop_limit, node.on_timeout):
                if target in (END, FAIL, "continue"):
                    continue
                if target not in self.nodes:
                    raise DefinitionError(f"{self.key}: {node.name!r} names unknown {target!r}")
                targeted.add(target)
            if node.on_failure not in (None, "escalate", "fail"):
                raise DefinitionError(
                    f"{self.key}: {node.name!r} on_failure must be 'escalate' or 'fail'"
                )
            if node.fallback and node.fallback == node.agent:
                raise DefinitionError(
                    f"{self.key}: {node.name!r} cannot fall back to its own agent"
                )
            if node.timeout and node.hard_timeout and node.hard_timeout < node.timeout:
                raise DefinitionError(
                    f"{self.key}: {node.name!r} hard_timeout is shorter than its timeout"
                )
            if isinstance(node.join, int) and not 1 <= node.join <= len(node.after):
                raise DefinitionError(
                    f"{self.key}: {node.name!r} join must be 1..{len(node.after)}"
                )
        for node in self.nodes.values():
            if node.kind in ("route",) or node.routes:
                continue
            self._successors[node.name] = tuple(succ[node.name])
        for node in self.nodes.values():
            if node.kind == "route" or node.routes:
                if succ[node.name]:
                    raise DefinitionError(
                        f"{self.key}: {node.name!r} routes; use its targets, not after={node.name!r}"
                    )
                self._successors[node.name] = node.targets
        if not self.start_nodes():
            raise DefinitionError(f"{self.key}: no start node (every node has a predecessor)")
        self._sealed = True
        return self

    def start_nodes(self) -> list[str]:
        targeted = {
            t for n in self.nodes.values() for t in (*n.targets, n.on_loop_limit, n.on_timeout)
        }
        return [n.name for n in self.nodes.values() if not n.after and n.name not in targeted]

    def successors(self, name: str) -> tuple[str, ...]:
        return self._successors[name]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    # --- a node's recovery, with this workflow's defaults ---------------------------------------

    def on_failure_of(self, node: Node) -> OnFailure:
        return node.on_failure or self.on_failure

    def retry_within_of(self, node: Node) -> timedelta:
        return node.retry_within or self.retry_within

    def timeouts_of(self, node: Node) -> tuple[timedelta, timedelta]:
        """(soft, hard) for one attempt of the node's agent."""
        soft = node.timeout or self.step_timeout
        hard = node.hard_timeout or (
            soft + timedelta(minutes=1) if node.timeout else self.step_hard_timeout
        )
        return soft, max(hard, soft)

    def escalation_timeout_of(self, node: Node) -> timedelta:
        return node.escalation_timeout or self.escalation_timeout

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "input_schema": self.input.model_json_schema(),
            "max_steps": self.max_steps,
            "max_duration_seconds": int(self.max_duration.total_seconds()),
            "on_failure": self.on_failure,
            "start": self.start_nodes(),
            "nodes": [n.describe() for n in self.nodes.values()],
        }


def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)
