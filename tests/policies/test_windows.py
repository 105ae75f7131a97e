"""Time windows across DST changes (policies/windows.py) in Europe/Berlin and America/New_York:
the boundaries stay at their local wall-clock times, and ``defer_until`` is exactly the
instant the window opens, including starts that fall in a spring-forward gap and hours that a
fall-back day runs through twice.

2026 transitions: Berlin springs forward on 29 March at 01:00 UTC (02:00 CET -> 03:00 CEST)
and falls back on 25 October at 01:00 UTC (03:00 CEST -> 02:00 CET); New York springs forward
on 8 March at 07:00 UTC (02:00 EST -> 03:00 EDT) and falls back on 1 November at 06:00 UTC
(02:00 EDT -> 01:00 EST).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from policies.evaluate import Facts, policy_decide
from policies.windows import WeeklyWindow
from tests.policies.documents import compiled

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"
EVERY_DAY = frozenset(range(7))


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def daytime_policy(start: str = "08:00", end: str = "20:00", zone: str = "tenant"):
    """Customer messages only inside the window; outside they wait (zone: the tenant's)."""
    window = {
        "days": ["mon-sun"],
        "start": start,
        "end": end,
        "zone": zone,
        "applies_to": {"action": "tool:send_sms"},
        "outside": {"decision": "defer"},
    }
    return compiled(time_windows={"daytime": window})


def decide(now: datetime, tenant_zone: str, **window: str):
    facts = Facts("tool:send_sms", tenant="acme", tenant_time_zone=tenant_zone)
    return policy_decide(daytime_policy(**window), facts, now)


@pytest.mark.parametrize(
    ("zone", "now", "opens"),
    [
        # The evening before spring forward: 08:00 the next morning is already summer time.
        (BERLIN, utc(2026, 3, 28, 19, 30), utc(2026, 3, 29, 6, 0)),
        (NEW_YORK, utc(2026, 3, 8, 2, 0), utc(2026, 3, 8, 12, 0)),
        # The evening before fall back: 08:00 the next morning is winter time again.
        (BERLIN, utc(2026, 10, 24, 19, 0), utc(2026, 10, 25, 7, 0)),
        (NEW_YORK, utc(2026, 11, 1, 2, 0), utc(2026, 11, 1, 13, 0)),
        # In the night of the change itself, after the clocks moved.
        (BERLIN, utc(2026, 3, 29, 1, 30), utc(2026, 3, 29, 6, 0)),
        (NEW_YORK, utc(2026, 11, 1, 6, 30), utc(2026, 11, 1, 13, 0)),
    ],
)
def test_defer_until_is_the_local_opening_after_a_dst_change(
    zone: str, now: datetime, opens: datetime
) -> None:
    decision = decide(now, zone)
    assert (decision.outcome, decision.rule) == ("defer", "window:daytime")
    assert decision.defer_until == opens
    assert opens.astimezone(ZoneInfo(zone)).strftime("%H:%M") == "08:00"
    # At that instant the window is open, a second before it is not.
    assert decide(opens, zone).outcome == "allow"
    assert decide(opens - timedelta(seconds=1), zone).defer_until == opens


@pytest.mark.parametrize(
    ("zone", "day", "open_utc", "close_utc"),
    [
        (BERLIN, (2026, 3, 28), (7, 0), (19, 0)),  # Saturday, CET (UTC+1)
        (BERLIN, (2026, 3, 29), (6, 0), (18, 0)),  # Sunday, CEST (UTC+2)
        (BERLIN, (2026, 10, 24), (6, 0), (18, 0)),  # Saturday, CEST
        (BERLIN, (2026, 10, 25), (7, 0), (19, 0)),  # Sunday, CET
        (
            NEW_YORK,
            (2026, 3, 7),
            (13, 0),
            (1, 0),
        ),  # Saturday, EST (UTC-5): closes 01:00 UTC next day
        (NEW_YORK, (2026, 3, 8), (12, 0), (0, 0)),  # Sunday, EDT (UTC-4)
        (NEW_YORK, (2026, 10, 31), (12, 0), (0, 0)),  # Saturday, EDT
        (NEW_YORK, (2026, 11, 1), (13, 0), (1, 0)),  # Sunday, EST
    ],
)
def test_the_window_boundaries_stay_at_local_08_00_and_20_00(
    zone: str, day: tuple[int, int, int], open_utc: tuple[int, int], close_utc: tuple[int, int]
) -> None:
    opens = utc(*day, *open_utc)
    closes = utc(*day, *close_utc)
    if closes < opens:
        closes += timedelta(days=1)
    assert decide(opens - timedelta(minutes=1), zone).outcome == "defer"
    assert decide(opens, zone).outcome == "allow"
    assert decide(closes - timedelta(seconds=1), zone).outcome == "allow"
    assert decide(closes, zone).outcome == "defer"


def test_a_fixed_zone_ignores_the_tenants_zone() -> None:
    # The window is in Berlin; the tenant in New York: 19:30 UTC on the Saturday is 20:30 CET.
    decision = decide(utc(2026, 3, 28, 19, 30), NEW_YORK, zone=BERLIN)
    assert decision.defer_until == utc(2026, 3, 29, 6, 0)


@pytest.mark.parametrize(
    ("zone", "now", "opens"),
    [
        # 02:30 does not exist on spring-forward day: the window opens at the jump to 03:00.
        (BERLIN, utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0)),
        (NEW_YORK, utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 0)),
    ],
)
def test_a_start_inside_the_spring_forward_gap_opens_at_the_jump(
    zone: str, now: datetime, opens: datetime
) -> None:
    decision = decide(now, zone, start="02:30", end="04:00")
    assert decision.defer_until == opens
    assert decide(opens - timedelta(seconds=1), zone, start="02:30", end="04:00").outcome == "defer"
    assert decide(opens, zone, start="02:30", end="04:00").outcome == "allow"


@pytest.mark.parametrize(
    ("zone", "start", "end", "first_close", "reopens"),
    [
        # 02:00-02:30 in Berlin on fall-back day: 02:00 CEST (00:00 UTC) to 02:30 CEST, then the
        # clocks fall back at 01:00 UTC to 02:00 CET and the wall clock is in the window again.
        (BERLIN, "02:00", "02:30", utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 0)),
        (NEW_YORK, "01:00", "01:30", utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6, 0)),
        # A window that starts before the repeated hour and ends inside it opens again at the
        # jump back itself, though its start time does not come round again.
        (BERLIN, "01:00", "02:30", utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 0)),
        (NEW_YORK, "00:30", "01:20", utc(2026, 11, 1, 5, 20), utc(2026, 11, 1, 6, 0)),
    ],
)
def test_a_window_in_the_repeated_hour_opens_again_when_the_clocks_fall_back(
    zone: str, start: str, end: str, first_close: datetime, reopens: datetime
) -> None:
    assert decide(first_close - timedelta(seconds=1), zone, start=start, end=end).outcome == "allow"
    waiting = decide(first_close + timedelta(minutes=10), zone, start=start, end=end)
    assert waiting.defer_until == reopens
    assert decide(reopens, zone, start=start, end=end).outcome == "allow"
    assert decide(reopens + timedelta(minutes=30), zone, start=start, end=end).outcome == "defer"


def test_a_window_across_midnight_belongs_to_the_day_it_starts() -> None:
    # Friday and Saturday nights, 22:00-06:00 Berlin.
    night = WeeklyWindow(frozenset({4, 5}), 22 * 60, 6 * 60)
    zone = ZoneInfo(BERLIN)
    assert night.is_open(utc(2026, 6, 19, 21, 0), zone)  # Fri 23:00
    assert night.is_open(utc(2026, 6, 20, 3, 0), zone)  # Sat 05:00, Friday's night
    assert night.is_open(utc(2026, 6, 21, 3, 59), zone)  # Sun 05:59, Saturday's night
    assert not night.is_open(utc(2026, 6, 21, 4, 0), zone)  # Sun 06:00
    assert not night.is_open(utc(2026, 6, 21, 21, 0), zone)  # Sun 23:00: not a listed night
    assert night.next_opening(utc(2026, 6, 21, 4, 0), zone) == utc(
        2026, 6, 26, 20, 0
    )  # next Fri 22:00


WINDOWS = {
    "daytime": WeeklyWindow(EVERY_DAY, 8 * 60, 20 * 60),
    "weekday office": WeeklyWindow(frozenset(range(5)), 9 * 60, 18 * 60),
    "in the gap": WeeklyWindow(EVERY_DAY, 2 * 60 + 30, 4 * 60),
    "repeated hour": WeeklyWindow(EVERY_DAY, 60, 90),
    "into the repeated hour": WeeklyWindow(EVERY_DAY, 30, 150),
    "night": WeeklyWindow(EVERY_DAY, 22 * 60, 2 * 60 + 15),
}
TRANSITIONS = {
    BERLIN: [utc(2026, 3, 29, 1, 0), utc(2026, 10, 25, 1, 0)],
    NEW_YORK: [utc(2026, 3, 8, 7, 0), utc(2026, 11, 1, 6, 0)],
}


@pytest.mark.parametrize("zone_name", [BERLIN, NEW_YORK])
@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_next_opening_is_the_first_open_minute_around_every_transition(
    zone_name: str, window_name: str
) -> None:
    # Exhaustive against the definition: whether the window is open at every minute from a day
    # before each change to nine days after, then each start's expected opening is the first
    # open minute at or after it.
    zone, window = ZoneInfo(zone_name), WINDOWS[window_name]
    for transition in TRANSITIONS[zone_name]:
        first = transition - timedelta(days=1)
        minutes = [first + timedelta(minutes=index) for index in range(10 * 24 * 60)]
        open_at = [window.is_open(moment, zone) for moment in minutes]
        # Every 23 minutes up to a day after the change, so that starts fall in every part of
        # every window near it (between a first closing and the jump back, too).
        for index in range(0, 2 * 24 * 60, 23):
            expected = minutes[open_at.index(True, index)]
            assert window.next_opening(minutes[index], zone) == expected, minutes[index]


@pytest.mark.parametrize("zone_name", [BERLIN, NEW_YORK])
def test_remembered_openings_agree_with_computing_each_one(zone_name: str) -> None:
    # A compiled window remembers the stretches it answered; any instant in one gets the same
    # answer as the schedule computed afresh, in any order of asking.
    import random

    from policies.conditions import Evaluation, window_compile
    from policies.document import TimeWindow

    definition = TimeWindow.model_validate(
        {"days": ["mon-fri"], "start": "02:30", "end": "20:00", "zone": "tenant"}
    )
    compiled = window_compile("office", definition)
    zone = ZoneInfo(zone_name)
    rng = random.Random(7)
    for transition in TRANSITIONS[zone_name]:
        moments = [
            transition + timedelta(minutes=rng.randint(-5 * 1440, 5 * 1440)) for _ in range(400)
        ]
        for moment in moments + sorted(moments):
            expected = compiled.schedule.next_opening(moment, zone)
            assert compiled.next_opening(Evaluation(moment, zone)) == expected, moment
