"""What an agent is: a plain class with an input contract, an output contract and ``run()``.

Agents never import Django models. The engine builds their input from run state, hands them an
:class:`AgentContext`, validates what they return and records it. An agent is testable with
nothing but pydantic: ``MyAgent().run(MyAgent.Input(...), AgentContext.for_test())``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from orchestration.errors import Code, StateAccessDenied, StepTimeout


@dataclass
class Usage:
    """Tokens and cost an agent reports for one execution."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    model: str = ""

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.model = other.model or self.model

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "model": self.model,
        }


class StateView:
    """The slice of run state a node may touch: reads and writes outside it are refused."""

    def __init__(self, values: Mapping[str, Any], *, reads: frozenset[str], writes: frozenset[str]):
        self._values = dict(values)
        self._reads = reads
        self._writes = writes
        self.written: dict[str, Any] = {}

    @property
    def writable(self) -> frozenset[str]:
        """The keys this node declared it writes."""
        return self._writes

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._reads and key not in self._writes:
            raise StateAccessDenied(
                f"state key {key!r} is not declared in this node's reads",
                detail={"key": key, "reads": sorted(self._reads)},
            )
        if key in self.written:
            return self.written[key]
        return self._values.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def set(self, key: str, value: Any) -> None:
        if key not in self._writes:
            raise StateAccessDenied(
                f"state key {key!r} is not declared in this node's writes",
                detail={"key": key, "writes": sorted(self._writes)},
            )
        self.written[key] = value


class ToolAccess(Protocol):
    """What an agent may call: capabilities by name, never provider SDKs (the engine supplies it)."""

    def call(self, capability: str, params: BaseModel | dict[str, Any]) -> BaseModel: ...


@dataclass
class AgentContext:
    """Everything an agent may use besides its input. Built by the engine for each attempt."""

    run_id: int
    step_key: str
    attempt: int
    state: StateView
    seed: int
    trace_id: str = ""
    usage: Usage = field(default_factory=Usage)
    # Demo agents take "realistic time"; the engine scales it (0 in tests and benchmarks).
    time_scale: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    notes: list[str] = field(default_factory=list)
    #: Capabilities through the tool registry (retries, fallbacks, limits, records).
    tools: ToolAccess | None = None
    #: Set by :meth:`degrade`: why this result is partial.
    degraded: str = ""
    #: When the soft timeout of this attempt passes (monotonic clock), if it has one.
    soft_deadline: float | None = None
    #: The engine's: called before the agent acts on the world or waits (a tool call, ``work``,
    #: a timeout check). A ``pure`` agent may start before the commit that made its step ready
    #: is acknowledged; this is where the engine makes sure it was.
    before_acting: Callable[[], None] | None = None
    #: The most completion tokens this call may ask for: what its cost reservation covers
    #: (None: no ceiling is in force, the agent's own ``max_tokens``).
    max_tokens: int | None = None

    def _acting(self) -> None:
        if self.before_acting is not None:
            self.before_acting()

    def call_tool(self, capability: str, params: BaseModel | dict[str, Any]) -> BaseModel:
        """Call a capability; the engine picks the provider, retries, records every attempt."""
        self._acting()
        if self.tools is None:
            from orchestration.errors import PermanentError

            raise PermanentError("this context has no tool access", code=Code.NO_TOOL_ACCESS)
        return self.tools.call(capability, params)

    @property
    def random(self) -> random.Random:
        """A random generator that is deterministic for (run seed, step, attempt)."""
        if not hasattr(self, "_random"):
            digest = hashlib.sha256(f"{self.seed}:{self.step_key}:{self.attempt}".encode()).digest()
            self._random = random.Random(int.from_bytes(digest[:8], "big"))
        return self._random

    def work(self, seconds: float) -> None:
        """Spend (scaled) wall time, as a real model or API call would."""
        self._acting()
        if self.time_scale > 0 and seconds > 0:
            self.sleep(seconds * self.time_scale)
        self.check_timeout()

    def degrade(self, reason: str) -> None:
        """Mark this result as partial ("2 of 5 sources answered"): the run goes on, and the
        degradation is shown on the run and listed in its output."""
        self.degraded = reason.strip()[:500] or "degraded result"

    def check_timeout(self) -> None:
        """Raise :class:`StepTimeout` once the attempt's soft timeout has passed. Workers also
        interrupt the agent there on their own where they can; long loops should call this."""
        self._acting()
        if self.soft_deadline is not None and time.monotonic() >= self.soft_deadline:
            raise StepTimeout("the step ran past its soft timeout", code=Code.STEP_TIMEOUT)

    def report_usage(
        self,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
        model: str = "",
    ) -> None:
        self.usage.add(Usage(prompt_tokens, completion_tokens, cost_usd, model))

    @classmethod
    def for_test(
        cls,
        state: Mapping[str, Any] | None = None,
        *,
        reads: frozenset[str] | set[str] | None = None,
        writes: frozenset[str] | set[str] | None = None,
        seed: int = 0,
        attempt: int = 1,
        step_key: str = "test",
    ) -> AgentContext:
        """A context for unit tests of an agent, outside the engine."""
        state = dict(state or {})
        return cls(
            run_id=0,
            step_key=step_key,
            attempt=attempt,
            state=StateView(
                state,
                reads=frozenset(reads if reads is not None else state.keys()),
                writes=frozenset(writes or ()),
            ),
            seed=seed,
            time_scale=0.0,
        )


class CompensationInput(BaseModel):
    """What a compensating agent is given: the completed step it undoes and why."""

    step: str
    input: Any = None
    output: Any = None
    reason: str = ""


class Agent:
    """Base class for agents. Subclasses set ``Input``/``Output`` and implement ``run``."""

    #: Registry name, e.g. ``"classifier"``.
    name: ClassVar[str] = ""
    #: What the agent can do, for the registry listing (``"classify"``, ``"draft"``).
    capability: ClassVar[str] = ""
    #: The worker pool (Celery queue ``pool.<name>``) that runs it unless the node overrides it.
    pool: ClassVar[str] = "default"
    #: Transient failures are retried up to this many attempts in total (the node may override).
    max_attempts: ClassVar[int] = 3
    #: True when the agent's output depends only on its input and state, and whatever it does
    #: to the world goes through ``ctx.call_tool``: the engine may then start it while the
    #: commit that made its step ready is still on its way to the disk, and drops its result if
    #: that commit does not go through. Its first tool call, ``ctx.work`` or timeout check waits
    #: for the commit. An agent that calls an API itself (an LLM client) must leave this False.
    pure: ClassVar[bool] = False
    #: The model it calls, priced by the policy's price table ("": it calls none, costs nothing).
    model: ClassVar[str] = ""
    #: The most completion tokens one call asks for, and the input it is expected to send: the
    #: worst case reserved against the cost ceilings before it runs.
    max_tokens: ClassVar[int] = 1024
    estimated_input_tokens: ClassVar[int] = 2000
    Input: ClassVar[type[BaseModel]]
    Output: ClassVar[type[BaseModel]]

    def call_model(self) -> str:
        """The model the next call uses, as the price table names it ("": none, it costs
        nothing). An agent configured at run time (an endpoint's model from the environment)
        answers with what it will ask for."""
        return self.model

    def input_tokens_estimate(self, input: BaseModel) -> int:
        """The input tokens this call may send, for the worst case reserved before it runs."""
        return self.estimated_input_tokens

    def run(self, input: Any, ctx: AgentContext) -> BaseModel | dict[str, Any]:
        raise NotImplementedError
