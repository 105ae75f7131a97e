"""A rule's conditions compiled into checks; pure and built for speed.

A check answers True, False or None. None means the fact it needs is missing, or cannot be
compared (a string where a number is expected, NaN, a malformed address): the rule then fails
closed — a restricting rule (deny, approval, defer) matches, an allowing one does not. So a
refund with no readable amount meets the strictest refund rule, never the most lenient one.

Numbers: a float fact is compared with the threshold as a float (so ``100.1 >= 100.1`` holds
as anyone reading the rule expects); ints, Decimals and numeric strings exactly, as Decimals.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

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

MISSING: Any = object()
ORDERING: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class Clock:
    """``now`` for one decision, with local times computed once per zone."""

    __slots__ = ("_local", "now", "tenant_zone")

    def __init__(self, now: datetime, tenant_zone: ZoneInfo) -> None:
        self.now = now
        self.tenant_zone = tenant_zone
        self._local: dict[ZoneInfo, datetime] = {}

    def local(self, zone: ZoneInfo) -> datetime:
        """``now`` on a wall clock in ``zone``."""
        found = self._local.get(zone)
        if found is None:
            found = self._local[zone] = self.now.astimezone(zone)
        return found


@dataclass(frozen=True, slots=True)
class CompiledWindow:
    """A time window ready to test: its schedule and its zone (None: the tenant's)."""

    name: str
    schedule: WeeklyWindow
    zone: ZoneInfo | None
    summary: str

    def zone_for(self, clock: Clock) -> ZoneInfo:
        """The zone the window is read in for this decision."""
        return self.zone if self.zone is not None else clock.tenant_zone

    def is_open(self, clock: Clock) -> bool:
        """Whether the window is open at the clock's ``now``."""
        return self.schedule.is_open_local(clock.local(self.zone_for(clock)))

    def next_opening(self, clock: Clock) -> datetime:
        """When the window next opens (``now`` if it is open)."""
        return self.schedule.next_opening(clock.now, self.zone_for(clock))


def window_compile(name: str, window: TimeWindow) -> CompiledWindow:
    """A document's time window, compiled."""
    days = frozenset(DAYS.index(day) for day in window.days)
    schedule = WeeklyWindow(days, local_time_minutes(window.start), local_time_minutes(window.end))
    zone = None if window.zone == "tenant" else zone_get(window.zone)
    where = "the tenant's zone" if zone is None else window.zone
    summary = f"{days_text(window.days)} {window.start}-{window.end}, {where}"
    return CompiledWindow(name, schedule, zone, summary)


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


def _reader(path: str) -> Callable[[Facts], Any]:
    root, _, rest = path.partition(".")
    if root == "params":
        keys = tuple(rest.split("."))

        def read_param(facts: Facts) -> Any:
            value: Any = facts.params
            for key in keys:
                if isinstance(value, Mapping):
                    value = value.get(key, MISSING)
                elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                    value = value[int(key)]
                else:
                    return MISSING
                if value is MISSING or value is None:
                    return MISSING
            return value

        return read_param
    if root == "spend":
        return lambda facts: facts.spend.get(rest, MISSING)

    def read_attribute(facts: Facts) -> Any:
        value = getattr(facts, root)
        return MISSING if value is None or value == "" else value

    return read_attribute


def _first_present(readers: tuple[Callable[[Facts], Any], ...]) -> Callable[[Facts], Any]:
    if len(readers) == 1:
        return readers[0]

    def read(facts: Facts) -> Any:
        for reader in readers:
            value = reader(facts)
            if value is not MISSING:
                return value
        return MISSING

    return read


def as_number(value: Any) -> float | int | Decimal | None:
    """A fact as a number to compare, or None if it is not one (bools are not numbers)."""
    kind = type(value)
    if kind is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if kind is int or kind is Decimal:
        return value if kind is int or value.is_finite() else None
    if kind is str:
        try:
            number = Decimal(value.strip().replace("_", ""))
        except InvalidOperation:
            return None
        return number if number.is_finite() else None
    return None


# --- checks -------------------------------------------------------------------------------------


class Check:
    """One compiled condition."""

    __slots__ = ()

    def test(self, facts: Facts, clock: Clock) -> bool | None:
        """True, False, or None when it cannot be decided (the rule then fails closed)."""
        raise NotImplementedError

    def explain(self, facts: Facts, clock: Clock) -> str:
        """What the condition saw, in words, for a decision's reason."""
        raise NotImplementedError


class FactCheck(Check):
    """A comparison of one fact with a value, a list of values, or an allowlist."""

    __slots__ = ("_test", "paths", "read", "text")

    def __init__(self, paths: tuple[str, ...], text: str, test: Callable[[Any], bool | None]) -> None:
        self.paths = paths
        self.read = _first_present(tuple(_reader(path) for path in paths))
        self.text = text
        self._test = test

    def test(self, facts: Facts, clock: Clock) -> bool | None:
        value = self.read(facts)
        return None if value is MISSING else self._test(value)

    def explain(self, facts: Facts, clock: Clock) -> str:
        value = self.read(facts)
        name = " or ".join(self.paths)
        if value is MISSING:
            return f"{name} is missing (required: {self.text})"
        result = self._test(value)
        seen = f"{name} is {value!r}"
        if result is None:
            return f"{seen}, which cannot be compared (required: {self.text})"
        return f"{seen}, {self.text}"


class WindowCheck(Check):
    """Now inside or outside a named time window."""

    __slots__ = ("inside", "window")

    def __init__(self, window: CompiledWindow, inside: bool) -> None:
        self.window = window
        self.inside = inside

    def test(self, facts: Facts, clock: Clock) -> bool | None:
        return self.window.is_open(clock) is self.inside

    def explain(self, facts: Facts, clock: Clock) -> str:
        local = clock.local(self.window.zone_for(clock))
        where = "inside" if self.window.is_open(clock) else "outside"
        return f"it is {local:%a %H:%M} {local.tzname()}, {where} {self.window.name} ({self.window.summary})"


def check_compile(
    condition: FactCondition | WindowCondition,
    windows: Mapping[str, CompiledWindow],
    allowlists: Mapping[str, Allowlist],
) -> Check:
    """A condition of a validated document, compiled (its references exist)."""
    if isinstance(condition, WindowCondition):
        return WindowCheck(windows[condition.window], condition.op == "inside")
    paths = tuple(condition.fact)
    op = condition.op
    if condition.allowlist is not None:
        inside = _allowlist_test(allowlists[condition.allowlist])
        if op == "in_allowlist":
            return FactCheck(paths, f"in allowlist {condition.allowlist}", inside)
        return FactCheck(paths, f"not in allowlist {condition.allowlist}", _negate(inside))
    value = condition.value
    text = f"{op} {_value_text(value)}"
    if op in ORDERING:
        return FactCheck(paths, text, _ordering_test(ORDERING[op], value))
    if op in ("==", "!="):
        equal = _equality_test(value)
        return FactCheck(paths, text, equal if op == "==" else _negate(equal))
    member = _membership_test(value)
    return FactCheck(paths, text, member if op == "in" else _negate(member))


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


def _negate(test: Callable[[Any], bool | None]) -> Callable[[Any], bool | None]:
    def negated(value: Any) -> bool | None:
        result = test(value)
        return None if result is None else not result

    return negated


def _ordering_test(compare: Callable[[Any, Any], bool], threshold: int | Decimal) -> Callable[[Any], bool | None]:
    exact = threshold
    approximate = float(threshold)

    def ordered(value: Any) -> bool | None:
        if type(value) is float:
            if value != value:  # NaN compares false with everything: unknown, not "no"
                return None
            return compare(value, approximate)
        number = as_number(value)
        return None if number is None else compare(number, exact)

    return ordered


def _equality_test(expected: Any) -> Callable[[Any], bool | None]:
    if isinstance(expected, bool):
        return lambda value: value is expected if isinstance(value, bool) else None
    if isinstance(expected, str):
        return lambda value: value == expected if isinstance(value, str) else None
    exact, approximate = expected, float(expected)

    def equal(value: Any) -> bool | None:
        if type(value) is float:
            return value == approximate if value == value else None
        number = as_number(value)
        return None if number is None else number == exact

    return equal


def _membership_test(items: list[Any]) -> Callable[[Any], bool | None]:
    strings = frozenset(item for item in items if isinstance(item, str))
    flags = frozenset(item for item in items if isinstance(item, bool))
    numbers = [item for item in items if not isinstance(item, bool | str)]
    exact = frozenset(numbers)
    approximate = frozenset(float(number) for number in numbers)

    def member(value: Any) -> bool | None:
        if isinstance(value, bool):
            return value in flags
        if isinstance(value, str) and value in strings:
            return True
        if type(value) is float:
            return value in approximate if value == value else None
        number = as_number(value)
        if number is None:
            # A string that is no number is simply not in a list of numbers and other strings.
            return False if isinstance(value, str) else None
        return number in exact

    return member


def domain_of(text: str) -> str | None:
    """The domain of an address (``Ann <ann@Example.com>``), a URL or a bare domain, lower-case;
    None if there is none."""
    value = text.strip().lower()
    if value.endswith(">") and "<" in value:
        value = value[value.rfind("<") + 1 : -1]
    if "@" in value:
        value = value.rsplit("@", 1)[1]
    elif "://" in value:
        value = urlsplit(value).hostname or ""
    value = value.rstrip(".")
    if not value or any(char.isspace() or char in "/@:<>" for char in value):
        return None
    return value


def _allowlist_test(allowlist: Allowlist) -> Callable[[Any], bool | None]:
    kind = allowlist.kind
    exact = frozenset(entry for entry in allowlist.entries if not entry.startswith("*."))
    suffixes = tuple(entry[1:] for entry in allowlist.entries if entry.startswith("*."))
    if kind == "tools":
        exact = frozenset(entry.removeprefix("tool:").lower() for entry in allowlist.entries)

    def one(value: Any) -> bool | None:
        if not isinstance(value, str):
            return None
        if kind == "domains":
            domain = domain_of(value)
            if domain is None:
                return None
            return domain in exact or (bool(suffixes) and domain.endswith(suffixes))
        if kind == "recipients":
            address = value.strip().lower()
            if address.endswith(">") and "<" in address:
                address = address[address.rfind("<") + 1 : -1]
            return address in exact if "@" in address else None
        if kind == "tools":
            return value.removeprefix("tool:").lower() in exact
        return value in exact

    def inside(value: Any) -> bool | None:
        # Several recipients: inside only if every one is.
        if isinstance(value, list | tuple):
            results = [one(item) for item in value]
            if False in results:
                return False
            return None if None in results else True
        return one(value)

    return inside
