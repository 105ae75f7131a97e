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

The package: ``values`` (names, globs, paths, durations, times, money), ``rule_parts``
(conditions and outcomes), ``sections`` (rules, windows, allowlists, ceilings, prices, rate
limits, bounds, the document); every public name is importable from ``policies.document``.
"""

from policies.document.rule_parts import (
    Allow,
    Condition,
    Defer,
    DeferUntilOpen,
    Deny,
    FactCondition,
    Outcome,
    OutsideOutcome,
    RequireApproval,
    WindowCondition,
)
from policies.document.sections import (
    Allowlist,
    AppliesTo,
    Bounds,
    Ceiling,
    PolicyDocument,
    Price,
    RateLimit,
    Rule,
    TimeWindow,
    document_reference_problems,
)
from policies.document.values import (
    ALLOWLIST_OPS,
    DAYS,
    DOMAIN_PATTERN,
    DURATION_PATTERN,
    EQUALITY_OPS,
    FACT_ROOTS,
    GLOB_PATTERN,
    LOCAL_TIME_PATTERN,
    MEMBERSHIP_OPS,
    MODEL_NAME_PATTERN,
    MONEY_MAX,
    NAME_PATTERN,
    NAME_RULES,
    ORDERING_OPS,
    SCOPES,
    ActionGlob,
    ActionGlobs,
    CompareValue,
    DocumentProblems,
    Duration,
    FactPath,
    Glob,
    Globs,
    LocalTime,
    Location,
    ModelName,
    Money,
    Name,
    Strict,
    Text,
    Tier,
    WorkflowKey,
    duration_text,
    local_time_minutes,
    one_or_many,
    path_text,
    zone_get,
)

__all__ = [
    "ALLOWLIST_OPS",
    "DAYS",
    "DOMAIN_PATTERN",
    "DURATION_PATTERN",
    "EQUALITY_OPS",
    "FACT_ROOTS",
    "GLOB_PATTERN",
    "LOCAL_TIME_PATTERN",
    "MEMBERSHIP_OPS",
    "MODEL_NAME_PATTERN",
    "MONEY_MAX",
    "NAME_PATTERN",
    "NAME_RULES",
    "ORDERING_OPS",
    "SCOPES",
    "ActionGlob",
    "ActionGlobs",
    "Allow",
    "Allowlist",
    "AppliesTo",
    "Bounds",
    "Ceiling",
    "CompareValue",
    "Condition",
    "Defer",
    "DeferUntilOpen",
    "Deny",
    "DocumentProblems",
    "Duration",
    "FactCondition",
    "FactPath",
    "Glob",
    "Globs",
    "LocalTime",
    "Location",
    "ModelName",
    "Money",
    "Name",
    "Outcome",
    "OutsideOutcome",
    "PolicyDocument",
    "Price",
    "RateLimit",
    "RequireApproval",
    "Rule",
    "Strict",
    "Text",
    "Tier",
    "TimeWindow",
    "WindowCondition",
    "WorkflowKey",
    "document_reference_problems",
    "duration_text",
    "local_time_minutes",
    "one_or_many",
    "path_text",
    "zone_get",
]
