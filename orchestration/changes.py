"""What one engine transaction reads and what it writes and sends, as plain data.

An advance of a run is computed in three parts: a :class:`Snapshot` (the rows the decision
needs, loaded first by ``orchestration.store``), the computation (``orchestration.advance``,
which touches no database), and a :class:`Changes` (new and updated rows, audit entries, and
the messages to send after commit), written by the store in one call and sent by
``orchestration.dispatch``.

A computation that finds it needs a row the snapshot did not load raises :class:`Missing`; the
caller loads it and computes again from scratch (the computation is deterministic, so that is
safe), which keeps the common completion free of any read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from audit.services import Entry
from audit.verbs import Verb
from infra.sql import unsaved
from orchestration.graph import MapProgress
from orchestration.models import Run, RunEvent, StateVersion, Step, ToolCall, Wait
from policies.active import ActivePolicy
from policies.ledger import Settlement
from policies.models import PolicyDecision, Tenant

# --- what a decision reads ----------------------------------------------------------------------

#: The run's steps that are pending, queued, running or waiting.
ACTIVE_STEPS = "active_steps"
#: The run's succeeded agent and item steps (what compensation may undo).
DONE_STEPS = "done_steps"
#: The run's open waits.
OPEN_WAITS = "open_waits"
#: Outside events the run received that no wait has taken yet.
UNAPPLIED_EVENTS = "unapplied_events"
#: The tool calls earlier attempts of the snapshot's focus step made (for an escalation).
TOOL_CALLS = "tool_calls"
#: How the map of the snapshot's focus step (a map item) stands.
MAP_PROGRESS = "map_progress"

NEEDS = frozenset(
    {ACTIVE_STEPS, DONE_STEPS, OPEN_WAITS, UNAPPLIED_EVENTS, TOOL_CALLS, MAP_PROGRESS}
)


class Missing(Exception):
    """The computation needs rows the snapshot did not load: load ``needs`` and compute again."""

    def __init__(self, needs: str) -> None:
        super().__init__(f"the snapshot lacks {needs}")
        self.needs = frozenset(needs.split(","))


@dataclass
class Snapshot:
    """The rows one advance of a run may read, loaded before it is computed. A part that was not
    loaded raises :class:`Missing` when asked for."""

    run: Run
    #: The step the change is about (completing, failing, decided), as read with the run.
    focus: Step | None = None
    loaded: frozenset[str] = frozenset()
    #: One object per step row: every list below, the waits' steps and the focus share them,
    #: so a move made through one is seen through all.
    steps: dict[int, Step] = field(default_factory=dict)
    active: list[Step] = field(default_factory=list)
    done: list[Step] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    events: list[RunEvent] = field(default_factory=list)
    focus_tool_calls: list[ToolCall] = field(default_factory=list)
    map_progress: MapProgress | None = None
    #: The policy in force (compiled) and the run's tenant: what an action is decided with.
    #: None: no policy is active, nothing is enforced.
    policy: ActivePolicy | None = None
    tenant: Tenant | None = None

    def _need(self, what: str) -> None:
        if what not in self.loaded:
            raise Missing(what)

    def require(self, *needs: str) -> None:
        """Raise :class:`Missing` for whatever of ``needs`` was not loaded (all at once)."""
        missing = [n for n in needs if n not in self.loaded]
        if missing:
            raise Missing(",".join(missing))

    def active_steps(self) -> list[Step]:
        self._need(ACTIVE_STEPS)
        return self.active

    def done_steps(self) -> list[Step]:
        self._need(DONE_STEPS)
        return self.done

    def open_waits(self, step: Step) -> list[Wait]:
        self._need(OPEN_WAITS)
        return [w for w in self.waits if w.step_id == step.pk]

    def unapplied_event(self, name: str) -> RunEvent | None:
        self._need(UNAPPLIED_EVENTS)
        return next((e for e in self.events if e.name == name and e.applied_at is None), None)

    def adopt(self, step: Step) -> Step:
        """The one object for ``step``'s row: ``step`` itself if the row was not seen yet."""
        if step.pk is None:
            return step
        return self.steps.setdefault(step.pk, step)

    def tool_calls(self) -> list[ToolCall]:
        self._need(TOOL_CALLS)
        return self.focus_tool_calls

    def map_state(self) -> MapProgress:
        self._need(MAP_PROGRESS)
        assert self.map_progress is not None
        return self.map_progress


# --- what a decision writes and sends -------------------------------------------------------------


@dataclass
class Fence:
    """The completing step's own update, guarded so that only the attempt that holds the step
    may write it: ``status='running' AND attempt=token AND lease_owner=owner``. With ``claims``,
    the step was never claimed in the database (a pure step run right after its sibling, in the
    sibling's transaction): the fence claims it as well, from ``queued`` at ``token - 1``."""

    step_id: int
    token: int
    owner: str
    values: dict[str, Any]
    claims: bool = False


@dataclass
class Record:
    """An audit entry whose ids may not exist yet (a new step's): resolved when written."""

    verb: Verb
    object_type: str
    obj: Any  # an id, or a model instance whose pk is read at write time
    step: Step | None
    actor_type: str
    actor_id: str
    payload: Any
    data: dict[str, Any]

    def entry(self, run: Run) -> Entry:
        obj = self.obj.pk if hasattr(self.obj, "pk") else self.obj
        return Entry(
            verb=self.verb,
            object_type=self.object_type,
            object_id=obj,
            actor_type=self.actor_type,
            actor_id=self.actor_id,
            run_id=run.pk,
            step_id=self.step.pk if self.step is not None else None,
            trace_id=run.trace_id,
            payload=self.payload,
            data=self.data,
        )


@dataclass
class Wakeup:
    """A broker message that wakes a worker for a queued step, after commit."""

    step: Step
    delay: float = 0.0


@dataclass
class Changes:
    """Everything one transaction writes to one run's rows, and what goes out after commit."""

    run: Run
    now: datetime
    #: The run row does not exist yet (a submit): it is inserted.
    insert_run: bool = False
    #: Optimistic: the run row was read without a lock; it is written only if its version is
    #: still this one (else the transaction aborts and the caller computes again).
    expected_version: int | None = None
    fence: Fence | None = None
    new_steps: list[Step] = field(default_factory=list)
    #: Existing steps' changed fields, by step (the latest value of each field wins).
    step_updates: dict[int, tuple[Step, dict[str, Any]]] = field(default_factory=dict)
    new_waits: list[Wait] = field(default_factory=list)
    wait_updates: list[tuple[Wait, dict[str, Any]]] = field(default_factory=list)
    new_events: list[RunEvent] = field(default_factory=list)
    event_updates: list[tuple[RunEvent, dict[str, Any]]] = field(default_factory=list)
    state_versions: list[StateVersion] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: Policy decisions made in this change, as their rows' column values but the run's and the
    #: step's ids, with the step each is about (ids resolved when written).
    decisions: list[tuple[dict[str, Any], Step | None]] = field(default_factory=list)
    #: Audit entries, in order: ready ones (a tool call's) and records whose ids are resolved
    #: when written.
    audit: list[Entry | Record] = field(default_factory=list)
    #: Claim this queued step for the worker as the transaction's last statement (a handed-off
    #: sibling the worker takes at the end of its chain): (step id, worker, lease until).
    claim_after: tuple[int, str, datetime] | None = None
    #: Reservations the completed attempt settles, written in this same transaction.
    settlements: list[Settlement] = field(default_factory=list)

    # after commit
    wakeups: list[Wakeup] = field(default_factory=list)
    #: Wake-ups of steps in pools this worker serves: held back a moment, since the worker will
    #: likely claim them itself (``orchestration.worker.held``).
    held: list[Wakeup] = field(default_factory=list)
    live: list[dict[str, Any]] = field(default_factory=list)
    #: A step created in this transaction already claimed by this worker, to run after commit.
    local_step: Step | None = None

    def update_step(self, step: Step, **fields: Any) -> None:
        if step.pk is None:  # created in this same transaction: its insert carries the fields
            for name, value in fields.items():
                setattr(step, name, value)
            return
        _, existing = self.step_updates.setdefault(step.pk, (step, {}))
        existing.update(fields)

    def audit_entries(self) -> list[Entry]:
        """Every audit entry, ids resolved (call after the rows got their ids)."""
        return [e.entry(self.run) if isinstance(e, Record) else e for e in self.audit]

    def decision_rows(self) -> list[PolicyDecision]:
        """The policy decisions, their run and step ids resolved (call after those have ids)."""
        run_id = self.run.id
        return [
            unsaved(PolicyDecision, **values, run_id=run_id, step_id=_id_of(step))
            for values, step in self.decisions
        ]

    def decision_json_rows(self) -> list[dict[str, Any]]:
        """:meth:`decision_rows` as JSON rows (``infra.sql.insert_rows``): no model built."""
        run_id = self.run.id
        return [
            {
                **values,
                "run_id": run_id,
                "step_id": _id_of(step),
                "created_at": values["created_at"].isoformat(),
            }
            for values, step in self.decisions
        ]

    def live_events(self) -> list[dict[str, Any]]:
        """The live events, ids resolved (call after the rows got their ids)."""
        return [_resolved(event, self.run.pk) for event in self.live]

    def handed_off(self) -> list[Step]:
        """Steps handed to the broker now (not delayed retries)."""
        return [w.step for w in (*self.wakeups, *self.held) if w.delay == 0]

    def steps_to_insert(self) -> Iterable[Step]:
        return self.new_steps


def _id_of(step: Step | None) -> int | None:
    return step.id if step is not None else None


def _resolved(event: Mapping[str, Any], run_id: int) -> dict[str, Any]:
    out = {"run_id": run_id, **{k: v for k, v in event.items() if k != "step"}}
    step = event.get("step")
    if step is not None:
        out["step_id"] = step.pk
    return out
