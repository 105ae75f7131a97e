"""The policy editor's forms, one per kind of item: an approval-tier rule, an allowlist, a cost
ceiling, a time window and a rate limit. Each turns its fields into the document's JSON shape
(``to_item``) and can be filled from an existing item (``initial_from``); whether the result is
a valid document is decided by ``policies.edits``, not here."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django import forms

SPLIT = re.compile(r"[\s,]+")


def _words(value: str) -> list[str]:
    return [word for word in SPLIT.split(value.strip()) if word]


def _number(value: Decimal) -> int | Decimal:
    return int(value) if value == value.to_integral_value() else value


def _joined(value: Any) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value or "")


class ItemForm(forms.Form):
    """An editor form: which document section it edits, and how its item is named."""

    section = ""
    title = ""

    def identity(self) -> str:
        return ""

    def to_item(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        """The form's initial values for an existing item; None if the form cannot show it."""
        raise NotImplementedError


class ApprovalRuleForm(ItemForm):
    section = "rules"
    title = "Approval-tier rule"

    id = forms.SlugField(
        label="Rule id", max_length=64, help_text="e.g. refund-tier-2; an existing id is replaced"
    )
    description = forms.CharField(max_length=500)
    action = forms.CharField(
        label="Actions",
        max_length=1000,
        help_text="agent:<name> or tool:<capability>, comma-separated",
    )
    workflow = forms.CharField(
        label="Workflows", max_length=1000, required=False, help_text="optional, comma-separated"
    )
    fact = forms.CharField(
        label="Amount fact",
        max_length=500,
        initial="params.amount",
        required=False,
        help_text="paths, comma-separated: the first present is used",
    )
    op = forms.ChoiceField(
        label="Comparison", choices=[(">", "above"), (">=", "at least")], initial=">"
    )
    threshold = forms.DecimalField(
        label="Threshold",
        required=False,
        max_digits=16,
        decimal_places=6,
        help_text="leave empty: every matching action",
    )
    tier = forms.TypedChoiceField(
        choices=[(1, "Tier 1"), (2, "Tier 2"), (3, "Tier 3")], coerce=int, initial=1
    )
    quorum = forms.IntegerField(
        min_value=1, max_value=10, initial=1, help_text="distinct approvers"
    )
    sla = forms.CharField(label="SLA", max_length=20, initial="24h", help_text="e.g. 4h, 1d")

    def identity(self) -> str:
        return str(self.cleaned_data["id"])

    def to_item(self) -> dict[str, Any]:
        data = self.cleaned_data
        item: dict[str, Any] = {
            "id": data["id"],
            "description": data["description"],
            "action": _words(data["action"]),
            "outcome": {
                "decision": "require_approval",
                "tier": data["tier"],
                "quorum": data["quorum"],
                "sla": data["sla"],
            },
        }
        if data["workflow"].strip():
            item["workflow"] = _words(data["workflow"])
        if data["threshold"] is not None:
            item["when"] = [
                {
                    "fact": _words(data["fact"] or "params.amount"),
                    "op": data["op"],
                    "value": _number(data["threshold"]),
                }
            ]
        return item

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        outcome = item.get("outcome") or {}
        when = item.get("when") or []
        if (
            outcome.get("decision") != "require_approval"
            or outcome.get("tier") is None
            or len(when) > 1
        ):
            return None
        initial = {
            "id": item["id"],
            "description": item.get("description", ""),
            "action": _joined(item.get("action")),
            "workflow": _joined(item.get("workflow") or []),
            "tier": outcome["tier"],
            "quorum": outcome.get("quorum", 1),
            "sla": outcome.get("sla", "24h"),
        }
        if when:
            condition = when[0]
            if condition.get("op") not in (">", ">=") or "fact" not in condition:
                return None
            initial.update(
                fact=_joined(condition["fact"]), op=condition["op"], threshold=condition["value"]
            )
        else:
            initial.update(fact="", threshold=None)
        return initial


class AllowlistForm(ItemForm):
    section = "allowlists"
    title = "Allowlist"

    name = forms.SlugField(max_length=64, help_text="an existing name is replaced")
    kind = forms.ChoiceField(choices=[(k, k) for k in ("domains", "recipients", "tools", "values")])
    description = forms.CharField(max_length=500, required=False)
    entries = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4}), help_text="one per line (or comma-separated)"
    )

    def identity(self) -> str:
        return str(self.cleaned_data["name"])

    def to_item(self) -> dict[str, Any]:
        data = self.cleaned_data
        item = {"kind": data["kind"], "entries": _words(data["entries"])}
        if data["description"]:
            item["description"] = data["description"]
        return item

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "name": identity,
            "kind": item.get("kind"),
            "description": item.get("description", ""),
            "entries": "\n".join(item.get("entries") or []),
        }


class CeilingForm(ItemForm):
    section = "ceilings"
    title = "Cost ceiling"

    scope = forms.ChoiceField(
        choices=[(s, s) for s in ("run", "workflow_day", "agent_day", "tenant_month", "global_day")]
    )
    key = forms.CharField(
        max_length=200, required=False, help_text="a workflow, agent or tenant; empty: each of them"
    )
    limit = forms.DecimalField(max_digits=14, decimal_places=6, min_value=Decimal("0.000001"))
    soft_ratio = forms.DecimalField(
        label="Warn at (share)",
        max_digits=4,
        decimal_places=3,
        initial=Decimal("0.8"),
        min_value=Decimal("0.001"),
        max_value=Decimal(1),
    )

    def identity(self) -> str:
        key = self.cleaned_data["key"].strip()
        return f"{self.cleaned_data['scope']} {key}" if key else str(self.cleaned_data["scope"])

    def to_item(self) -> dict[str, Any]:
        data = self.cleaned_data
        item: dict[str, Any] = {
            "scope": data["scope"],
            "limit": data["limit"],
            "soft_ratio": data["soft_ratio"],
        }
        if data["key"].strip():
            item["key"] = data["key"].strip()
        return item

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "scope": item.get("scope"),
            "key": item.get("key", ""),
            "limit": item.get("limit"),
            "soft_ratio": item.get("soft_ratio", "0.8"),
        }


class TimeWindowForm(ItemForm):
    section = "time_windows"
    title = "Time window"

    name = forms.SlugField(max_length=64, help_text="an existing name is replaced")
    description = forms.CharField(max_length=500, required=False)
    days = forms.CharField(max_length=100, initial="mon-fri", help_text="e.g. mon-fri, sat")
    start = forms.CharField(max_length=5, initial="09:00", help_text="HH:MM local time")
    end = forms.CharField(
        max_length=5, initial="18:00", help_text="HH:MM; at or before start crosses midnight"
    )
    zone = forms.CharField(
        max_length=64, initial="tenant", help_text="an IANA zone, or tenant: the tenant's zone"
    )
    applies_to = forms.CharField(
        label="Governs actions",
        max_length=1000,
        required=False,
        help_text="optional, comma-separated; needs an outside outcome",
    )
    outside = forms.ChoiceField(
        label="Outside the window",
        required=False,
        choices=[
            ("", "(only named by rules)"),
            ("defer", "defer until it opens"),
            ("require_approval", "require an approval"),
        ],
    )
    outside_tier = forms.TypedChoiceField(
        label="Approval tier outside",
        coerce=int,
        initial=2,
        choices=[(1, "Tier 1"), (2, "Tier 2"), (3, "Tier 3")],
    )

    def identity(self) -> str:
        return str(self.cleaned_data["name"])

    def to_item(self) -> dict[str, Any]:
        data = self.cleaned_data
        item: dict[str, Any] = {
            "days": _words(data["days"]),
            "start": data["start"],
            "end": data["end"],
            "zone": data["zone"],
        }
        if data["description"]:
            item["description"] = data["description"]
        if data["applies_to"].strip():
            item["applies_to"] = {"action": _words(data["applies_to"])}
        if data["outside"] == "defer":
            item["outside"] = {"decision": "defer"}
        elif data["outside"] == "require_approval":
            item["outside"] = {"decision": "require_approval", "tier": data["outside_tier"]}
        return item

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        outside = item.get("outside") or {}
        return {
            "name": identity,
            "description": item.get("description", ""),
            "days": _joined(item.get("days")),
            "start": item.get("start"),
            "end": item.get("end"),
            "zone": item.get("zone"),
            "applies_to": _joined((item.get("applies_to") or {}).get("action") or []),
            "outside": outside.get("decision", ""),
            "outside_tier": outside.get("tier") or 2,
        }


class RateLimitForm(ItemForm):
    section = "rate_limits"
    title = "Rate limit"

    id = forms.SlugField(label="Limit id", max_length=64, help_text="an existing id is replaced")
    description = forms.CharField(max_length=500, required=False)
    action = forms.CharField(label="Actions", max_length=1000, help_text="comma-separated")
    per = forms.ChoiceField(
        label="Counted per",
        choices=[(p, p) for p in ("global", "tenant", "workflow", "agent", "run")],
    )
    limit = forms.IntegerField(min_value=1, max_value=1_000_000)
    period = forms.CharField(max_length=20, initial="1m", help_text="e.g. 1m, 1h")

    def identity(self) -> str:
        return str(self.cleaned_data["id"])

    def to_item(self) -> dict[str, Any]:
        data = self.cleaned_data
        item: dict[str, Any] = {
            "id": data["id"],
            "action": _words(data["action"]),
            "per": data["per"],
            "limit": data["limit"],
            "period": data["period"],
        }
        if data["description"]:
            item["description"] = data["description"]
        return item

    @classmethod
    def initial_from(cls, identity: str, item: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "id": item.get("id"),
            "description": item.get("description", ""),
            "action": _joined(item.get("action")),
            "per": item.get("per", "global"),
            "limit": item.get("limit"),
            "period": item.get("period"),
        }


#: The editor's forms by document section, in the order the page shows them.
ITEM_FORMS: dict[str, type[ItemForm]] = {
    form.section: form
    for form in (ApprovalRuleForm, AllowlistForm, CeilingForm, TimeWindowForm, RateLimitForm)
}
