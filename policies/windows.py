"""Weekly time windows in local wall-clock time, correct across DST changes; pure.

A window is open when the local time, read on a wall clock in its zone, is on one of its days
between ``start`` (included) and ``end`` (excluded); an ``end`` at or before ``start`` crosses
midnight and belongs to the day it started. So "08:00-20:00" opens at 08:00 local on the day
the clocks change too, whatever the UTC offset.

Two DST cases need care, and :meth:`WeeklyWindow.next_opening` handles both by also looking at
the zone's transitions: a ``start`` that does not exist on a spring-forward day (02:30 when the
clocks jump from 02:00 to 03:00) opens at the jump, the first instant whose wall time is past
it; and on a fall-back day the wall clock runs through an hour twice, so a window can open
again at the jump back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

DAY = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class WeeklyWindow:
    """A compiled window: days (0 is Monday), start and end in minutes after local midnight."""

    days: frozenset[int]
    start: int
    end: int

    def is_open_local(self, local: datetime) -> bool:
        """Whether the window is open at ``local``, a wall-clock time in the window's zone."""
        minute = local.hour * 60 + local.minute
        weekday = local.weekday()
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Crosses midnight: the evening of an open day, or the morning after one.
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end
        )

    def is_open(self, moment: datetime, zone: ZoneInfo) -> bool:
        """Whether the window is open at the aware instant ``moment``."""
        return self.is_open_local(moment.astimezone(zone))

    def next_opening(self, moment: datetime, zone: ZoneInfo) -> datetime:
        """The first instant after ``moment`` at which the window is open, in UTC; ``moment``
        itself if it is open already."""
        if self.is_open(moment, zone):
            return moment.astimezone(UTC)
        bound = self._next_start(moment, zone)
        # A transition before that start may open the window earlier (see the module's notes);
        # with the same offset at both ends there is none in between (zones change at most
        # twice a year, never twice within the nine days a search spans).
        if moment.astimezone(zone).utcoffset() != bound.astimezone(zone).utcoffset():
            for transition in _transitions(zone, moment, bound):
                if self.is_open(transition, zone):
                    return transition
        return bound

    def _next_start(self, moment: datetime, zone: ZoneInfo) -> datetime:
        # The first instant after ``moment`` whose wall time is the start on an open day (the
        # first of the two on a fall-back day); days in order, so usually today or tomorrow.
        local_day = moment.astimezone(zone).date()
        for offset in range(9):
            day = local_day + offset * DAY
            if day.weekday() not in self.days:
                continue
            for instant in _instants_at(day, self.start, zone):
                if instant > moment and self.is_open(instant, zone):
                    return instant
        raise AssertionError("a window with at least one day opens within nine days")


def _instants_at(day: date, minute: int, zone: ZoneInfo) -> list[datetime]:
    """Every UTC instant whose wall time in ``zone`` is ``day`` at ``minute``: two on a
    fall-back day, none inside a spring-forward gap."""
    if minute >= 1440:
        day, minute = day + DAY, minute - 1440
    wall = datetime.combine(day, time(minute // 60, minute % 60))
    # PEP 495: fold=0 reads a wall time with the offset before a transition, fold=1 with the
    # one after. Equal offsets: one instant; the earlier offset larger: the hour repeats (two
    # instants); smaller: the wall time falls in the gap and never happens.
    before = zone.utcoffset(wall)
    after = zone.utcoffset(wall.replace(fold=1))
    assert before is not None and after is not None  # a ZoneInfo always has an offset
    if before == after:
        return [(wall - before).replace(tzinfo=UTC)]
    if before > after:
        return [(wall - before).replace(tzinfo=UTC), (wall - after).replace(tzinfo=UTC)]
    return []


def _transitions(zone: ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """The instants in (``after``, ``until``] where ``zone``'s UTC offset changes, found by
    bisection to the second (tz transitions fall on whole seconds). Assumes at most one change
    per day, which holds for every zone in the tz database over the days a window spans."""
    found: list[datetime] = []
    low = after.astimezone(UTC).replace(microsecond=0)
    while low < until:
        high = min(low + DAY, until)
        if low.astimezone(zone).utcoffset() != high.astimezone(zone).utcoffset():
            left, right = low, high
            while right - left > timedelta(seconds=1):
                middle = left + (right - left) / 2
                middle = middle.replace(microsecond=0)
                if middle.astimezone(zone).utcoffset() == left.astimezone(zone).utcoffset():
                    left = middle
                else:
                    right = middle
            if right > after:
                found.append(right)
        low = high
    return found
