"""The document's other sections (time windows, allowlists, ceilings, prices, rate limits,
bounds) and the whole document, with the checks that span sections."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

from policies.document.rule_parts import (
    Condition,
    Defer,
    FactCondition,
    Outcome,
    OutsideOutcome,
    WindowCondition,
)
from policies.document.values import (
    DOMAIN_PATTERN,
    NAME_PATTERN,
    ActionGlobs,
    DocumentProblems,
    Duration,
    Globs,
    LocalTime,
    Location,
    ModelName,
    Money,
    Name,
    Strict,
    Text,
    WorkflowKey,
    days_parse,
    local_time_minutes,
    zone_check,
)

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
    days: Annotated[
        list[str],
        PlainValidator(days_parse),
        WithJsonSchema({"type": "array", "items": {"type": "string"}, "examples": [["mon-fri"]]}),
    ]
    start: LocalTime
    end: LocalTime
    zone: Annotated[str, AfterValidator(zone_check)]
    applies_to: AppliesTo | None = None
    outside: OutsideOutcome | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TimeWindow:
        if local_time_minutes(self.start) % 1440 == local_time_minutes(self.end) % 1440:
            raise DocumentProblems([(("end",), "end must differ from start")])
        if self.start == "24:00":
            raise DocumentProblems([(("start",), "start must be before 24:00")])
        if self.applies_to is not None and self.outside is None:
            raise DocumentProblems(
                [
                    (
                        ("outside",),
                        "a window that applies to actions says what happens outside it: "
                        "{decision: defer} or {decision: require_approval, tier: N}",
                    )
                ]
            )
        if self.outside is not None and self.applies_to is None:
            raise DocumentProblems(
                [(("applies_to",), "outside needs applies_to: which actions the window governs")]
            )
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
                problems.append(
                    (
                        ("entries", index),
                        f"{entry!r} is not a lower-case domain (example.com, *.example.com)",
                    )
                )
            elif self.kind == "recipients" and (entry != entry.lower() or entry.count("@") != 1):
                problems.append(
                    (
                        ("entries", index),
                        f"{entry!r} is not a lower-case address (name@example.com)",
                    )
                )
            elif self.kind == "tools" and not NAME_PATTERN.fullmatch(
                entry.removeprefix("tool:").lower()
            ):
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
    soft_ratio: Annotated[Decimal, Field(gt=0, le=1, max_digits=4, decimal_places=3)] = Decimal(
        "0.8"
    )

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
            problems.append(
                (
                    ("rules", index, "id"),
                    f"rule id {rule.id!r} is already used by rules[{seen[rule.id]}]",
                )
            )
        seen.setdefault(rule.id, index)
        for position, condition in enumerate(rule.when):
            if (
                isinstance(condition, WindowCondition)
                and condition.window not in document.time_windows
            ):
                problems.append(
                    (
                        ("rules", index, "when", position, "window"),
                        _missing("time window", condition.window, document.time_windows),
                    )
                )
            if (
                isinstance(condition, FactCondition)
                and condition.allowlist is not None
                and condition.allowlist not in document.allowlists
            ):
                problems.append(
                    (
                        ("rules", index, "when", position, "allowlist"),
                        _missing("allowlist", condition.allowlist, document.allowlists),
                    )
                )
        if isinstance(rule.outcome, Defer) and rule.outcome.until not in document.time_windows:
            problems.append(
                (
                    ("rules", index, "outcome", "until"),
                    _missing("time window", rule.outcome.until, document.time_windows),
                )
            )
    ceilings: dict[tuple[str, str | None], int] = {}
    for index, ceiling in enumerate(document.ceilings):
        key = (ceiling.scope, ceiling.key)
        if key in ceilings:
            problems.append(
                (
                    ("ceilings", index),
                    f"a ceiling for {ceiling.scope} {ceiling.key or '(every key)'} is already ceilings[{ceilings[key]}]",
                )
            )
        ceilings.setdefault(key, index)
    limits: dict[str, int] = {}
    for index, limit in enumerate(document.rate_limits):
        if limit.id in limits:
            problems.append(
                (
                    ("rate_limits", index, "id"),
                    f"rate limit id {limit.id!r} is already used by rate_limits[{limits[limit.id]}]",
                )
            )
        limits.setdefault(limit.id, index)
    return problems


def _missing(kind: str, name: str, defined: dict[str, Any]) -> str:
    known = ", ".join(sorted(defined)) or "none is defined"
    return f"no {kind} is called {name!r} (defined: {known})"
