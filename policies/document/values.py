"""The value types of a policy document: names, globs, fact paths, durations, local times,
money and thresholds, each validated with a message an admin can act on."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)

Location = tuple[str | int, ...]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
NAME_RULES = (
    "must be 1-64 characters: lower-case letters, digits, '-', '_' or '.', "
    "starting with a letter or a digit"
)
# Globs over action names, workflow names and tenant slugs: literal characters plus * and ?.
GLOB_PATTERN = re.compile(r"[A-Za-z0-9_.:*?/@-]{1,200}")
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/@+-]{1,200}")
DOMAIN_PATTERN = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)
DURATION_PATTERN = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
LOCAL_TIME_PATTERN = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)|24:00")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SCOPES = ("run", "workflow_day", "agent_day", "tenant_month", "global_day")
#: What a condition's ``fact`` may start with (``params`` and ``spend`` take a path after a dot).
FACT_ROOTS = ("params", "spend", "action", "kind", "workflow", "node", "tenant", "agent", "run_id")
ORDERING_OPS = (">", ">=", "<", "<=")
EQUALITY_OPS = ("==", "!=")
MEMBERSHIP_OPS = ("in", "not_in")
ALLOWLIST_OPS = ("in_allowlist", "not_in_allowlist")
# Money fits SpendScope's columns (14 digits, 6 after the point).
MONEY_MAX = Decimal("99999999.999999")


class DocumentProblems(ValueError):
    """Several problems found in one validator, each at its own path below the validated
    object, so that an editor can point at each (``policies.source`` unpacks them)."""

    def __init__(self, problems: Sequence[tuple[Location, str]]) -> None:
        self.problems = list(problems)
        super().__init__(
            "; ".join(f"{path_text(loc) or '(document)'}: {msg}" for loc, msg in self.problems)
        )


def path_text(loc: Sequence[str | int]) -> str:
    """``('rules', 2, 'outcome', 'tier')`` as ``rules[2].outcome.tier``; odd keys are quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            text += f".{part}" if text else part
        else:
            text += f'["{part}"]'
    return text


# --- value types --------------------------------------------------------------------------------


def _name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(NAME_RULES)
    return value


def _glob(value: str) -> str:
    if not GLOB_PATTERN.fullmatch(value):
        raise ValueError("must be a name or a glob (letters, digits, '_', '.', ':', '-', '*', '?')")
    return value


def _action_glob(value: str) -> str:
    _glob(value)
    if not (value == "*" or value.startswith(("agent:", "tool:", "*:"))):
        raise ValueError(
            f"{value!r} must start with 'agent:' or 'tool:' (e.g. 'tool:send_email', 'agent:*')"
        )
    return value


def one_or_many(value: Any) -> Any:
    # A single name is written without brackets; stored, it is always a list.
    return [value] if isinstance(value, str) else value


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str):
        found = DURATION_PATTERN.fullmatch(value.strip())
        if not value.strip() or not found:
            raise ValueError("must be a duration such as '90s', '30m', '8h', '2d' or '1h30m'")
        days, hours, minutes, secs = (int(part or 0) for part in found.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    else:
        raise ValueError("must be a duration such as '30m', '8h' or '2d'")
    if seconds <= 0 or seconds != int(seconds):
        raise ValueError("must be a whole number of seconds above zero")
    if seconds > 366 * 86400:
        raise ValueError("must be at most a year (366d)")
    return timedelta(seconds=int(seconds))


def duration_text(value: timedelta) -> str:
    """A duration in the compact form documents use: ``1h30m``, ``2d``, ``45s``."""
    rest = int(value.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


Duration = Annotated[
    timedelta,
    PlainValidator(_duration),
    PlainSerializer(duration_text),
    WithJsonSchema(
        {"type": "string", "pattern": DURATION_PATTERN.pattern, "examples": ["30m", "8h"]}
    ),
]


def _local_time(value: Any) -> str:
    text = value.strip() if isinstance(value, str) else None
    found = LOCAL_TIME_PATTERN.fullmatch(text) if text else None
    if not text or not found:
        raise ValueError("must be a local time 'HH:MM' from 00:00 to 24:00, e.g. '08:00'")
    hour, _, minute = text.partition(":")
    return f"{int(hour):02d}:{minute}"


LocalTime = Annotated[
    str,
    PlainValidator(_local_time),
    WithJsonSchema(
        {"type": "string", "pattern": LOCAL_TIME_PATTERN.pattern, "examples": ["08:00"]}
    ),
]


def local_time_minutes(value: str) -> int:
    """``'08:30'`` as 510 minutes after midnight (``'24:00'`` is 1440)."""
    hour, _, minute = value.partition(":")
    return int(hour) * 60 + int(minute)


def _money(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("must be an amount of money, e.g. 50.00")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError("must be an amount of money, e.g. 50.00") from None
    if not amount.is_finite() or amount < 0 or amount > MONEY_MAX:
        raise ValueError(f"must be an amount from 0 to {MONEY_MAX}")
    if amount.as_tuple().exponent < -6:  # type: ignore[operator]  # finite: an int exponent
        raise ValueError("must have at most 6 digits after the decimal point")
    return amount


Money = Annotated[
    Decimal,
    PlainValidator(_money),
    PlainSerializer(str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\d+(\.\d{1,6})?$"},
            ]
        }
    ),
]


def _scalar(value: Any) -> bool | int | Decimal | str:
    # Numbers that are not whole become Decimal, so thresholds are exact whatever the source.
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("must be a finite number")
        return value
    raise ValueError("must be a number, a string, true or false")


def _compare_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_scalar(item) for item in value]
    return _scalar(value)


def _compare_value_json(value: Any) -> Any:
    # In JSON a threshold is a number, not a string, so that it reads back as a number.
    if isinstance(value, list):
        return [_compare_value_json(item) for item in value]
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


_SCALAR_SCHEMA = {"type": ["number", "string", "boolean"]}
CompareValue = Annotated[
    Any,
    PlainValidator(_compare_value),
    PlainSerializer(_compare_value_json, when_used="json"),
    WithJsonSchema({"anyOf": [_SCALAR_SCHEMA, {"type": "array", "items": _SCALAR_SCHEMA}]}),
]


def _fact_path(value: str) -> str:
    root, _, rest = value.partition(".")
    if root not in FACT_ROOTS:
        raise ValueError(
            f"unknown fact {value!r}: a fact is params.<path>, spend.<scope> or one of "
            "action, kind, workflow, node, tenant, agent, run_id"
        )
    if root in ("params", "spend") and not rest:
        raise ValueError(
            f"{root} needs a path after it, e.g. {root}.{'amount' if root == 'params' else 'run'}"
        )
    if root not in ("params", "spend") and rest:
        raise ValueError(f"{root} has no parts: write just {root!r}")
    if any(not part for part in rest.split(".")) and rest:
        raise ValueError(f"{value!r} has an empty part")
    if root == "spend" and rest not in SCOPES:
        raise ValueError(f"spend.{rest}: the scope must be one of {', '.join(SCOPES)}")
    return value


def zone_check(value: str) -> str:
    """``value`` if it is ``tenant`` or an IANA zone; ValueError otherwise."""
    if value != "tenant" and zone_get(value) is None:
        raise ValueError(
            f"{value!r} is not a time zone: use an IANA name such as 'Europe/Berlin', or 'tenant'"
        )
    return value


@cache
def zone_get(name: str) -> ZoneInfo | None:
    """The IANA zone called ``name``, or None if there is none (cached: zones are immutable)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def days_parse(value: Any) -> list[str]:
    """Days and ranges of days (``[mon-fri, sun]``) as the sorted list of days they cover."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must list days, e.g. [mon-fri] or [mon, wed, sat]")
    chosen: set[int] = set()
    for item in value:
        first, dash, last = str(item).strip().lower().partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(
                f"{item!r} is not a day or a range of days (mon, tue, ..., sun; mon-fri)"
            )
        start, end = DAYS.index(first), DAYS.index(last if dash else first)
        # A range may wrap past Sunday (fri-mon).
        chosen.update((start + offset) % 7 for offset in range((end - start) % 7 + 1))
    return [DAYS[day] for day in sorted(chosen)]


Name = Annotated[str, AfterValidator(_name)]
Glob = Annotated[str, AfterValidator(_glob)]
ActionGlob = Annotated[str, AfterValidator(_action_glob)]
Globs = Annotated[list[Glob], BeforeValidator(one_or_many), Field(min_length=1, max_length=100)]
ActionGlobs = Annotated[
    list[ActionGlob], BeforeValidator(one_or_many), Field(min_length=1, max_length=100)
]
FactPath = Annotated[str, AfterValidator(_fact_path)]
Tier = Literal[1, 2, 3]
Text = Annotated[str, Field(max_length=1000)]


class Strict(BaseModel):
    """The base of every part of a document: unknown fields are refused, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _model_name(value: str) -> str:
    if not MODEL_NAME_PATTERN.fullmatch(value):
        raise ValueError(
            "must be a model name (letters, digits, '.', '-', '_', ':', '/', '@', '+')"
        )
    return value


def _workflow_key(value: str) -> str:
    if value != "*" and (not GLOB_PATTERN.fullmatch(value) or "*" in value or "?" in value):
        raise ValueError("must be a workflow's name, or '*' for every workflow")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
WorkflowKey = Annotated[str, AfterValidator(_workflow_key)]
