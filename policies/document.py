"""The policy document: what an admin writes, validated, stored as JSON in ``PolicyVersion.document``.

A document says what the system may do. Its sections:

* ``default`` — the decision for an action no rule covers (``allow`` or ``deny``);
* ``rules`` — each matches actions (``agent:<name>`` / ``tool:<capability>`` globs, optionally
  workflows and tenants), tests conditions over the action's facts and has an outcome: allow,
  deny, require approval (tier, quorum, SLA, expiry outcome, stages) or defer until a window opens;
* ``time_windows`` — weekly windows in a fixed zone or the tenant's; a window that
  ``applies_to`` actions says what happens outside it (defer until it opens, or an approval);
* ``allowlists`` — named sets of domains, recipients, tool names or plain values;
* ``ceilings`` — hard spending limits per scope, with a soft warning ratio;
* ``prices`` — money per 1K input and output tokens, per model;
* ``rate_limits`` — at most N actions per period, globally or per tenant, workflow, agent, run;
* ``bounds`` — per workflow: retries, loop iterations, run deadline, fan-out width.

Every model refuses unknown fields. References (a rule naming a window or an allowlist) are
checked when the whole document is validated; :class:`DocumentProblems` carries each problem
with its exact path so an editor can point at it. How each part is evaluated is in
``policies.evaluate``; how a source text becomes a document, in ``policies.source``.
"""

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
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Tag,
    WithJsonSchema,
    model_validator,
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
DOMAIN_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
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
        super().__init__("; ".join(f"{path_text(loc) or '(document)'}: {msg}" for loc, msg in self.problems))


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


def _one_or_many(value: Any) -> Any:
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
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN.pattern, "examples": ["30m", "8h"]}),
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
    WithJsonSchema({"type": "string", "pattern": LOCAL_TIME_PATTERN.pattern, "examples": ["08:00"]}),
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
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d{1,6})?$"}]}),
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
        raise ValueError(f"{root} needs a path after it, e.g. {root}.{'amount' if root == 'params' else 'run'}")
    if root not in ("params", "spend") and rest:
        raise ValueError(f"{root} has no parts: write just {root!r}")
    if any(not part for part in rest.split(".")) and rest:
        raise ValueError(f"{value!r} has an empty part")
    if root == "spend" and rest not in SCOPES:
        raise ValueError(f"spend.{rest}: the scope must be one of {', '.join(SCOPES)}")
    return value


def _zone(value: str) -> str:
    if value != "tenant" and zone_get(value) is None:
        raise ValueError(f"{value!r} is not a time zone: use an IANA name such as 'Europe/Berlin', or 'tenant'")
    return value


@cache
def zone_get(name: str) -> ZoneInfo | None:
    """The IANA zone called ``name``, or None if there is none (cached: zones are immutable)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _days(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must list days, e.g. [mon-fri] or [mon, wed, sat]")
    chosen: set[int] = set()
    for item in value:
        first, dash, last = str(item).strip().lower().partition("-")
        if first not in DAYS or (dash and last not in DAYS):
            raise ValueError(f"{item!r} is not a day or a range of days (mon, tue, ..., sun; mon-fri)")
        start, end = DAYS.index(first), DAYS.index(last if dash else first)
        # A range may wrap past Sunday (fri-mon).
        chosen.update((start + offset) % 7 for offset in range((end - start) % 7 + 1))
    return [DAYS[day] for day in sorted(chosen)]


Name = Annotated[str, AfterValidator(_name)]
Glob = Annotated[str, AfterValidator(_glob)]
ActionGlob = Annotated[str, AfterValidator(_action_glob)]
Globs = Annotated[list[Glob], BeforeValidator(_one_or_many), Field(min_length=1, max_length=100)]
ActionGlobs = Annotated[list[ActionGlob], BeforeValidator(_one_or_many), Field(min_length=1, max_length=100)]
FactPath = Annotated[str, AfterValidator(_fact_path)]
Tier = Literal[1, 2, 3]
Text = Annotated[str, Field(max_length=1000)]


class Strict(BaseModel):
    """The base of every part of a document: unknown fields are refused, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- outcomes -----------------------------------------------------------------------------------


class Allow(Strict):
    """The action goes ahead."""

    decision: Literal["allow"]
    reason: Text = ""


class Deny(Strict):
    """The action is refused; the reason is shown to whoever sees the refusal."""

    decision: Literal["deny"]
    reason: Annotated[str, Field(min_length=1, max_length=1000)]


class RequireApproval(Strict):
    """A person must sign off first: ``tier`` (or ``stages``, tiers in order), ``quorum``
    distinct approvers at each stage, within ``sla``; unanswered, ``on_expiry`` applies."""

    decision: Literal["require_approval"]
    tier: Tier | None = None
    #: Multi-stage sign-off, e.g. [2, 3]: a tier-2 approval, then a tier-3 one.
    stages: Annotated[list[Tier], Field(min_length=1, max_length=3)] | None = None
    quorum: Annotated[int, Field(ge=1, le=10)] = 1
    sla: Duration = timedelta(hours=24)
    #: Fail closed by default: an approval nobody answered in time is a rejection.
    on_expiry: Literal["reject", "approve"] = "reject"
    reason: Text = ""

    @model_validator(mode="after")
    def _tier_or_stages(self) -> RequireApproval:
        if (self.tier is None) == (self.stages is None):
            raise DocumentProblems([((), "give either tier (1, 2 or 3) or stages (e.g. [2, 3]), not both")])
        if self.stages is not None and any(a >= b for a, b in zip(self.stages, self.stages[1:], strict=False)):
            raise DocumentProblems([(("stages",), "stages must rise, e.g. [2, 3]: each stage a higher tier")])
        return self

    @property
    def stage_tiers(self) -> tuple[int, ...]:
        """The tiers that sign off, in order (one stage unless ``stages`` says more)."""
        return tuple(self.stages) if self.stages is not None else (self.tier or 1,)


class Defer(Strict):
    """The action waits until the named window is open (if it is open now, nothing waits)."""

    decision: Literal["defer"]
    until: Name
    reason: Text = ""


class DeferUntilOpen(Strict):
    """Outside a window: the action waits until the window opens."""

    decision: Literal["defer"]
    reason: Text = ""


Outcome = Annotated[Allow | Deny | RequireApproval | Defer, Field(discriminator="decision")]
OutsideOutcome = Annotated[DeferUntilOpen | RequireApproval, Field(discriminator="decision")]


# --- conditions ---------------------------------------------------------------------------------


class FactCondition(Strict):
    """A test of one fact: ``params.proposal.amount > 1000``, ``params.currency in [EUR, USD]``,
    ``params.to not_in_allowlist customer_domains``, ``spend.workflow_day >= 40``.

    ``fact`` may list several paths: the first one present is used (the same rule can read an
    agent's ``params.proposal.amount`` and a tool's ``params.amount``)."""

    fact: Annotated[list[FactPath], BeforeValidator(_one_or_many), Field(min_length=1, max_length=5)]
    op: Literal[">", ">=", "<", "<=", "==", "!=", "in", "not_in", "in_allowlist", "not_in_allowlist"]
    value: CompareValue = None
    allowlist: Name | None = None

    @model_validator(mode="after")
    def _operands_fit_the_op(self) -> FactCondition:
        if self.op in ALLOWLIST_OPS:
            if self.allowlist is None:
                raise DocumentProblems([(("allowlist",), f"op {self.op} needs the name of an allowlist")])
            if self.value is not None:
                raise DocumentProblems([(("value",), f"op {self.op} compares with an allowlist, not a value")])
            return self
        if self.allowlist is not None:
            raise DocumentProblems([(("allowlist",), f"op {self.op} compares with a value; use in_allowlist or not_in_allowlist")])
        if self.value is None:
            raise DocumentProblems([(("value",), f"op {self.op} needs a value")])
        if self.op in ORDERING_OPS and (isinstance(self.value, bool) or not isinstance(self.value, int | Decimal)):
            raise DocumentProblems([(("value",), f"op {self.op} needs a number")])
        if self.op in MEMBERSHIP_OPS and not isinstance(self.value, list):
            raise DocumentProblems([(("value",), f"op {self.op} needs a list, e.g. [EUR, USD]")])
        if self.op in EQUALITY_OPS and isinstance(self.value, list):
            raise DocumentProblems([(("value",), f"op {self.op} needs one value; use in or not_in for a list")])
        return self


class WindowCondition(Strict):
    """True when now is ``inside`` or ``outside`` (the default) the named time window."""

    window: Name
    op: Literal["inside", "outside"] = "outside"


def _condition_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "window" if "window" in value else "fact"
    return "window" if isinstance(value, WindowCondition) else "fact"


Condition = Annotated[
    Annotated[FactCondition, Tag("fact")] | Annotated[WindowCondition, Tag("window")],
    Discriminator(_condition_kind),
]


# --- sections -----------------------------------------------------------------------------------


class Rule(Strict):
    """Matches actions (and optionally workflows and tenants); when every condition holds, its
    outcome applies. How several matching rules combine: ``policies.evaluate``."""

    id: Name
    description: Annotated[str, Field(min_length=1, max_length=500)]
    action: ActionGlobs
    workflow: Globs | None = None
    tenant: Globs | None = None
    when: Annotated[list[Condition], Field(max_length=20)] = []
    outcome: Outcome


class AppliesTo(Strict):
    """The actions a time window governs."""

    action: ActionGlobs
    workflow: Globs | None = None
    tenant: Globs | None = None


class TimeWindow(Strict):
    """A weekly window in local time: ``days`` from ``start`` to ``end`` (an ``end`` at or before
    ``start`` crosses midnight), in ``zone`` (an IANA name, or ``tenant``: the tenant's zone).
    Local wall-clock time decides, so 08:00 stays 08:00 across a DST change."""

    description: Text = ""
    days: Annotated[list[str], PlainValidator(_days), WithJsonSchema({"type": "array", "items": {"type": "string"}, "examples": [["mon-fri"]]})]
    start: LocalTime
    end: LocalTime
    zone: Annotated[str, AfterValidator(_zone)]
    applies_to: AppliesTo | None = None
    outside: OutsideOutcome | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TimeWindow:
        if local_time_minutes(self.start) % 1440 == local_time_minutes(self.end) % 1440:
            raise DocumentProblems([(("end",), "end must differ from start")])
        if self.start == "24:00":
            raise DocumentProblems([(("start",), "start must be before 24:00")])
        if self.applies_to is not None and self.outside is None:
            raise DocumentProblems([(
                ("outside",),
                "a window that applies to actions says what happens outside it: "
                "{decision: defer} or {decision: require_approval, tier: N}",
            )])
        if self.outside is not None and self.applies_to is None:
            raise DocumentProblems([(("applies_to",), "outside needs applies_to: which actions the window governs")])
        return self


class Allowlist(Strict):
    """A named set. ``domains`` match an address's or URL's domain (``*.example.com``: any
    subdomain); ``recipients`` whole addresses; ``tools`` capability names; ``values`` exact strings."""

    kind: Literal["domains", "recipients", "tools", "values"]
    description: Text = ""
    entries: Annotated[list[str], Field(max_length=10000)]

    @model_validator(mode="after")
    def _entries_fit_the_kind(self) -> Allowlist:
        problems: list[tuple[Location, str]] = []
        for index, entry in enumerate(self.entries):
            if self.kind == "domains" and not DOMAIN_PATTERN.fullmatch(entry):
                problems.append((("entries", index), f"{entry!r} is not a lower-case domain (example.com, *.example.com)"))
            elif self.kind == "recipients" and (entry != entry.lower() or entry.count("@") != 1):
                problems.append((("entries", index), f"{entry!r} is not a lower-case address (name@example.com)"))
            elif self.kind == "tools" and not NAME_PATTERN.fullmatch(entry.removeprefix("tool:").lower()):
                problems.append((("entries", index), f"{entry!r} is not a capability name"))
            elif not entry:
                problems.append((("entries", index), "an entry cannot be empty"))
        if problems:
            raise DocumentProblems(problems)
        return self


class Ceiling(Strict):
    """A hard spending limit for one scope (per run, per workflow a day, per agent a day, per
    tenant a month, everything a day). ``key`` narrows it to one workflow (for ``run`` and
    ``workflow_day``), agent or tenant; without it, each of them gets this limit."""

    scope: Literal["run", "workflow_day", "agent_day", "tenant_month", "global_day"]
    key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    limit: Money
    #: Spend above this share of the limit warns (0.8: at 80 %).
    soft_ratio: Annotated[Decimal, Field(gt=0, le=1, max_digits=4, decimal_places=3)] = Decimal("0.8")

    @model_validator(mode="after")
    def _key_fits_the_scope(self) -> Ceiling:
        if self.scope == "global_day" and self.key is not None:
            raise DocumentProblems([(("key",), "global_day covers everything: it has no key")])
        if self.limit <= 0:
            raise DocumentProblems([(("limit",), "must be above zero")])
        return self


class Price(Strict):
    """What a model costs, in the document's currency per 1,000 tokens."""

    input_per_1k: Money
    output_per_1k: Money


class RateLimit(Strict):
    """At most ``limit`` matching actions per ``period``, counted globally or per tenant,
    workflow, agent or run (the engine's shared counters enforce it)."""

    id: Name
    description: Text = ""
    action: ActionGlobs
    per: Literal["global", "tenant", "workflow", "agent", "run"] = "global"
    limit: Annotated[int, Field(ge=1, le=1_000_000)]
    period: Duration


class Bounds(Strict):
    """Limits on a workflow's runs; a field left out keeps the workflow's own value."""

    max_retries: Annotated[int, Field(ge=0, le=100)] | None = None
    max_loop_iterations: Annotated[int, Field(ge=1, le=1000)] | None = None
    run_deadline: Duration | None = None
    max_fan_out: Annotated[int, Field(ge=1, le=10000)] | None = None


def _model_name(value: str) -> str:
    if not MODEL_NAME_PATTERN.fullmatch(value):
        raise ValueError("must be a model name (letters, digits, '.', '-', '_', ':', '/', '@', '+')")
    return value


def _workflow_key(value: str) -> str:
    if value != "*" and (not GLOB_PATTERN.fullmatch(value) or "*" in value or "?" in value):
        raise ValueError("must be a workflow's name, or '*' for every workflow")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
WorkflowKey = Annotated[str, AfterValidator(_workflow_key)]


class PolicyDocument(Strict):
    """A whole policy: every section, validated together (references, unique ids).

    ``PolicyDocument.model_validate(version.document)`` reads a stored one back;
    ``document.model_dump(mode="json", exclude_none=True)`` is what to store."""

    format: Literal[1] = 1
    description: Text = ""
    #: The decision for an action no rule covers; deny is the safe production default.
    default: Literal["allow", "deny"]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    rules: Annotated[list[Rule], Field(max_length=2000)] = []
    time_windows: dict[Name, TimeWindow] = {}
    allowlists: dict[Name, Allowlist] = {}
    ceilings: Annotated[list[Ceiling], Field(max_length=1000)] = []
    prices: dict[ModelName, Price] = {}
    rate_limits: Annotated[list[RateLimit], Field(max_length=1000)] = []
    #: Per workflow name; ``"*"`` holds the bounds of every workflow without its own entry.
    bounds: dict[WorkflowKey, Bounds] = {}

    @model_validator(mode="after")
    def _references_and_ids(self) -> PolicyDocument:
        problems = document_reference_problems(self)
        if problems:
            raise DocumentProblems(problems)
        return self

    def to_json(self) -> dict[str, Any]:
        """The document as JSON values, as stored in ``PolicyVersion.document``."""
        return self.model_dump(mode="json", exclude_none=True)


def document_reference_problems(document: PolicyDocument) -> list[tuple[Location, str]]:
    """Every rule id used twice, and every window or allowlist named but not defined."""
    problems: list[tuple[Location, str]] = []
    seen: dict[str, int] = {}
    for index, rule in enumerate(document.rules):
        if rule.id in seen:
            problems.append((("rules", index, "id"), f"rule id {rule.id!r} is already used by rules[{seen[rule.id]}]"))
        seen.setdefault(rule.id, index)
        for position, condition in enumerate(rule.when):
            if isinstance(condition, WindowCondition) and condition.window not in document.time_windows:
                problems.append((("rules", index, "when", position, "window"), _missing("time window", condition.window, document.time_windows)))
            if isinstance(condition, FactCondition) and condition.allowlist is not None and condition.allowlist not in document.allowlists:
                problems.append((("rules", index, "when", position, "allowlist"), _missing("allowlist", condition.allowlist, document.allowlists)))
        if isinstance(rule.outcome, Defer) and rule.outcome.until not in document.time_windows:
            problems.append((("rules", index, "outcome", "until"), _missing("time window", rule.outcome.until, document.time_windows)))
    ceilings: dict[tuple[str, str | None], int] = {}
    for index, ceiling in enumerate(document.ceilings):
        key = (ceiling.scope, ceiling.key)
        if key in ceilings:
            problems.append((("ceilings", index), f"a ceiling for {ceiling.scope} {ceiling.key or '(every key)'} is already ceilings[{ceilings[key]}]"))
        ceilings.setdefault(key, index)
    limits: dict[str, int] = {}
    for index, limit in enumerate(document.rate_limits):
        if limit.id in limits:
            problems.append((("rate_limits", index, "id"), f"rate limit id {limit.id!r} is already used by rate_limits[{limits[limit.id]}]"))
        limits.setdefault(limit.id, index)
    return problems


def _missing(kind: str, name: str, defined: dict[str, Any]) -> str:
    known = ", ".join(sorted(defined)) or "none is defined"
    return f"no {kind} is called {name!r} (defined: {known})"
