"""A rule's conditions compiled into checks; pure and built for speed.

A check answers True, False or None. None means the fact it needs is missing, or cannot be
compared (a string where a number is expected, NaN, a malformed address): the rule then fails
closed — a restricting rule (deny, approval, defer) matches, an allowing one does not. So a
refund with no readable amount meets the strictest refund rule, never the most lenient one.

Numbers: a float fact is compared with the threshold as a float (so ``100.1 >= 100.1`` holds
as anyone reading the rule expects); ints, Decimals and numeric strings exactly, as Decimals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from policies.comparisons import (
    ORDERING,
    allowlist_test,
    equality_test,
    membership_test,
    negate,
    ordering_test,
    value_text,
)
from policies.document import (
    DAYS,
    Allowlist,
    FactCondition,
    TimeWindow,
    WindowCondition,
    local_time_minutes,
    zone_get,
)
from policies.facts import Facts
from policies.windows import WeeklyWindow

#: A fact not read yet in this evaluation (None is taken: it means "missing").
UNREAD: Any = object()


class Evaluation:
    """One decision in progress: ``now``, the tenant's zone, and what it computed once and
    reuses (local times per zone; each distinct fact path's value, so ten tier rules on
    ``params.proposal.amount`` read it once)."""

    __slots__ = ("_local", "now", "tenant_zone", "values")

    def __init__(self, now: datetime, tenant_zone: ZoneInfo, fact_paths: int = 0) -> None:
        self.now = now
        self.tenant_zone = tenant_zone
        self._local: dict[ZoneInfo, datetime] = {}
        self.values: list[Any] = [UNREAD] * fact_paths

    def local(self, zone: ZoneInfo) -> datetime:
        """``now`` on a wall clock in ``zone``."""
        found = self._local.get(zone)
        if found is None:
            found = self._local[zone] = self.now.astimezone(zone)
        return found


# Remembered openings per zone: a handful of closed stretches (one or two a day) cover a week.
OPENINGS_REMEMBERED = 32


@dataclass(frozen=True, slots=True)
class CompiledWindow:
    """A time window ready to test: its schedule and its zone (None: the tenant's)."""

    name: str
    schedule: WeeklyWindow
    zone: ZoneInfo | None
    summary: str
    #: Per zone, stretches [asked, opens) already answered (see :meth:`next_opening`).
    _openings: dict[ZoneInfo, list[tuple[datetime, datetime]]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def zone_for(self, evaluation: Evaluation) -> ZoneInfo:
        """The zone the window is read in for this decision."""
        return self.zone if self.zone is not None else evaluation.tenant_zone

    def is_open(self, evaluation: Evaluation) -> bool:
        """Whether the window is open at the decision's ``now``."""
        return self.schedule.is_open_local(evaluation.local(self.zone_for(evaluation)))

    def next_opening(self, evaluation: Evaluation) -> datetime:
        """When the window next opens (``now`` if it is open).

        If the opening after instant ``asked`` is ``opens``, the window is closed all through
        [asked, opens), so the answer is the same for any ``now`` in it: answers are kept as
        such stretches (exact, not an approximation), and a stretch is widened back to the
        earliest ``now`` that found it."""
        now, zone = evaluation.now, self.zone_for(evaluation)
        stretches = self._openings.setdefault(zone, [])
        for asked, opens in stretches:
            if asked <= now < opens:
                return opens
        if self.is_open(evaluation):
            return now.astimezone(UTC)
        opens = self.schedule.next_opening(now, zone)
        for index, (asked, known) in enumerate(stretches):
            if known == opens:
                stretches[index] = (min(asked, now), opens)
                return opens
        if len(stretches) >= OPENINGS_REMEMBERED:
            del stretches[0]
        stretches.append((now, opens))
        return opens


def window_compile(name: str, window: TimeWindow) -> CompiledWindow:
    """A document's time window, compiled."""
    days = frozenset(DAYS.index(day) for day in window.days)
    schedule = WeeklyWindow(days, local_time_minutes(window.start), local_time_minutes(window.end))
    zone = None if window.zone == "tenant" else zone_get(window.zone)
    where = "the tenant's zone" if zone is None else window.zone
    summary = f"{days_text(window.days)} {window.start}-{window.end}, {where}"
    return CompiledWindow(name, schedule, zone, summary)


def wall_text(local: datetime, *, with_date: bool = False) -> str:
    """``Wed 22:00 CEST`` (or ``Thu 2026-06-18 08:00 CEST``); strftime costs several times more."""
    day = f" {local.year}-{local.month:02d}-{local.day:02d}" if with_date else ""
    return f"{DAYS[local.weekday()].capitalize()}{day} {local.hour:02d}:{local.minute:02d} {local.tzname()}"


def days_text(days: list[str]) -> str:
    """``[mon, tue, wed, thu, fri, sun]`` as ``mon-fri,sun``."""
    indexes = sorted(DAYS.index(day) for day in days)
    runs: list[list[int]] = []
    for index in indexes:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ",".join(
        DAYS[run[0]] if len(run) == 1 else f"{DAYS[run[0]]}-{DAYS[run[-1]]}" for run in runs
    )


# --- reading facts ------------------------------------------------------------------------------
# A reader returns None for a fact that is missing (a null counts as missing: an amount of null
# is not known either).


def _walk(value: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
        if value is None:
            return None
    return value


def _reader(path: str) -> Callable[[Facts], Any]:
    root, _, rest = path.partition(".")
    if root == "spend":
        return lambda facts: facts.spend.get(rest)
    if root != "params":

        def read_attribute(facts: Facts) -> Any:
            value = getattr(facts, root)
            return None if value == "" else value

        return read_attribute
    keys = tuple(rest.split("."))
    first, more = keys[0], keys[1:]
    # The common shapes (params.amount, params.proposal.amount) read without a loop.
    if not more:
        return lambda facts: facts.params.get(first)
    if len(more) == 1:
        second = more[0]

        def read_nested(facts: Facts) -> Any:
            value = facts.params.get(first)
            if type(value) is dict:
                return value.get(second)
            return None if value is None else _walk(value, more)

        return read_nested
    return lambda facts: _walk(facts.params, keys)


def _first_present(readers: tuple[Callable[[Facts], Any], ...]) -> Callable[[Facts], Any]:
    if len(readers) == 1:
        return readers[0]

    def read(facts: Facts) -> Any:
        for reader in readers:
            value = reader(facts)
            if value is not None:
                return value
        return None

    return read


# --- checks -------------------------------------------------------------------------------------

Test = Callable[[Facts, Evaluation], "bool | None"]


class Check:
    """One compiled condition: ``test(facts, evaluation)`` answers True, False, or None when it
    cannot be decided (the rule then fails closed); ``explain`` says what it saw."""

    __slots__ = ("test",)

    test: Test

    def explain(self, facts: Facts, evaluation: Evaluation) -> str:
        """What the condition saw, in words, for a decision's reason."""
        raise NotImplementedError


class FactCheck(Check):
    """A comparison of one fact with a value, a list of values, or an allowlist.

    ``compare`` (a value in, True/False/None out) is the plain definition; ``test`` is the same
    check with the read folded in, and for ordering the common number types compared inline,
    because a decision runs many of them (``tests/policies`` checks that the two agree)."""

    __slots__ = ("compare", "paths", "read", "readers", "slot", "text")

    def __init__(
        self,
        paths: tuple[str, ...],
        slot: int,
        text: str,
        compare: Callable[[Any], bool | None],
    ) -> None:
        self.paths = paths
        self.slot = slot
        self.readers = tuple(_reader(path) for path in paths)
        self.read = _first_present(self.readers)
        self.text = text
        self.compare = compare
        self.test = _read_then_compare(self.read, slot, compare)

    def explain(self, facts: Facts, evaluation: Evaluation) -> str:
        # Named by the path that had the value (a rule may read one of several).
        found = next(
            (
                (path, value)
                for path, reader in zip(self.paths, self.readers, strict=True)
                if (value := reader(facts)) is not None
            ),
            None,
        )
        if found is None:
            return f"{' or '.join(self.paths)} is missing (required: {self.text})"
        name, value = found
        result = self.compare(value)
        seen = f"{name} is {value!r}"
        if result is None:
            return f"{seen}, which cannot be compared (required: {self.text})"
        return f"{seen}, {self.text}"


def _read_then_compare(
    read: Callable[[Facts], Any], slot: int, compare: Callable[[Any], bool | None]
) -> Test:
    def test(facts: Facts, evaluation: Evaluation) -> bool | None:
        values = evaluation.values
        value = values[slot]
        if value is UNREAD:
            value = values[slot] = read(facts)
        return None if value is None else compare(value)

    return test


class WindowCheck(Check):
    """Now inside or outside a named time window."""

    __slots__ = ("inside", "window")

    def __init__(self, window: CompiledWindow, inside: bool) -> None:
        self.window = window
        self.inside = inside
        self.test = lambda facts, evaluation: window.is_open(evaluation) is inside

    def explain(self, facts: Facts, evaluation: Evaluation) -> str:
        local = evaluation.local(self.window.zone_for(evaluation))
        where = "inside" if self.window.is_open(evaluation) else "outside"
        return f"it is {wall_text(local)}, {where} {self.window.name} ({self.window.summary})"


def check_compile(
    condition: FactCondition | WindowCondition,
    windows: Mapping[str, CompiledWindow],
    allowlists: Mapping[str, Allowlist],
    fact_slots: dict[tuple[str, ...], int],
) -> Check:
    """A condition of a validated document, compiled (its references exist). ``fact_slots``
    numbers each distinct fact path the policy reads (shared by all its conditions)."""
    if isinstance(condition, WindowCondition):
        return WindowCheck(windows[condition.window], condition.op == "inside")
    paths = tuple(condition.fact)
    slot = fact_slots.setdefault(paths, len(fact_slots))
    op = condition.op
    if condition.allowlist is not None:
        inside = allowlist_test(allowlists[condition.allowlist])
        if op == "in_allowlist":
            return FactCheck(paths, slot, f"in allowlist {condition.allowlist}", inside)
        return FactCheck(paths, slot, f"not in allowlist {condition.allowlist}", negate(inside))
    value = condition.value
    text = f"{op} {value_text(value)}"
    if op in ORDERING:
        check = FactCheck(paths, slot, text, ordering_test(ORDERING[op], value))
        check.test = _ordering_fast(check.read, slot, ORDERING[op], value, check.compare)
        return check
    if op in ("==", "!="):
        equal = equality_test(value)
        return FactCheck(paths, slot, text, equal if op == "==" else negate(equal))
    member = membership_test(value)
    check = FactCheck(paths, slot, text, member if op == "in" else negate(member))
    check.test = _membership_fast(check.read, slot, op == "in", value, check.compare)
    return check


def _ordering_fast(
    read: Callable[[Facts], Any],
    slot: int,
    compare: Callable[[Any, Any], bool],
    threshold: int | Decimal,
    ordered: Callable[[Any], bool | None],
) -> Test:
    # Whole thresholds as ints: comparing an int or a float with an int beats a Decimal.
    exact: int | Decimal = int(threshold) if threshold == int(threshold) else threshold
    approximate = float(threshold)
    isfinite = math.isfinite

    def test(facts: Facts, evaluation: Evaluation) -> bool | None:
        values = evaluation.values
        value = values[slot]
        if value is UNREAD:
            value = values[slot] = read(facts)
        kind = type(value)
        if kind is float:
            return compare(value, approximate) if isfinite(value) else None
        if kind is int:
            return compare(value, exact)
        if kind is Decimal and value.is_finite():
            return compare(value, exact)
        return None if value is None else ordered(value)

    return test


def _membership_fast(
    read: Callable[[Facts], Any],
    slot: int,
    wanted: bool,
    items: list[Any],
    member: Callable[[Any], bool | None],
) -> Test:
    # A string found among the listed strings is the common case (currencies, channels).
    strings = frozenset(item for item in items if isinstance(item, str))

    def test(facts: Facts, evaluation: Evaluation) -> bool | None:
        values = evaluation.values
        value = values[slot]
        if value is UNREAD:
            value = values[slot] = read(facts)
        if type(value) is str and value in strings:
            return wanted
        return None if value is None else member(value)

    return test
