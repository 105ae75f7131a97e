"""The parts of a rule: the conditions it tests and the outcomes it can have."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from policies.document.values import (
    ALLOWLIST_OPS,
    EQUALITY_OPS,
    MEMBERSHIP_OPS,
    ORDERING_OPS,
    CompareValue,
    DocumentProblems,
    Duration,
    FactPath,
    Name,
    Strict,
    Text,
    Tier,
    one_or_many,
)

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
            raise DocumentProblems(
                [((), "give either tier (1, 2 or 3) or stages (e.g. [2, 3]), not both")]
            )
        if self.stages is not None and any(
            a >= b for a, b in zip(self.stages, self.stages[1:], strict=False)
        ):
            raise DocumentProblems(
                [(("stages",), "stages must rise, e.g. [2, 3]: each stage a higher tier")]
            )
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

    fact: Annotated[list[FactPath], BeforeValidator(one_or_many), Field(min_length=1, max_length=5)]
    op: Literal[
        ">", ">=", "<", "<=", "==", "!=", "in", "not_in", "in_allowlist", "not_in_allowlist"
    ]
    value: CompareValue = None
    allowlist: Name | None = None

    @model_validator(mode="after")
    def _operands_fit_the_op(self) -> FactCondition:
        if self.op in ALLOWLIST_OPS:
            if self.allowlist is None:
                raise DocumentProblems(
                    [(("allowlist",), f"op {self.op} needs the name of an allowlist")]
                )
            if self.value is not None:
                raise DocumentProblems(
                    [(("value",), f"op {self.op} compares with an allowlist, not a value")]
                )
            return self
        if self.allowlist is not None:
            raise DocumentProblems(
                [
                    (
                        ("allowlist",),
                        f"op {self.op} compares with a value; use in_allowlist or not_in_allowlist",
                    )
                ]
            )
        if self.value is None:
            raise DocumentProblems([(("value",), f"op {self.op} needs a value")])
        if self.op in ORDERING_OPS and (
            isinstance(self.value, bool) or not isinstance(self.value, int | Decimal)
        ):
            raise DocumentProblems([(("value",), f"op {self.op} needs a number")])
        if self.op in MEMBERSHIP_OPS and not isinstance(self.value, list):
            raise DocumentProblems([(("value",), f"op {self.op} needs a list, e.g. [EUR, USD]")])
        if self.op in EQUALITY_OPS and isinstance(self.value, list):
            raise DocumentProblems(
                [(("value",), f"op {self.op} needs one value; use in or not_in for a list")]
            )
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
