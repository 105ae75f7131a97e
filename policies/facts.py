"""What the engine knows about an action when it asks the policy: the :class:`Facts`.

Facts are recorded with every decision (``PolicyDecision.facts``, via :meth:`Facts.to_json`) and
read back for simulation (:meth:`Facts.from_json`), so a recorded action can be decided again by
another version exactly as it was seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from policies.document import SCOPES, zone_get

KINDS = ("agent", "tool")


@dataclass(frozen=True, slots=True)
class Facts:
    """One action about to happen: ``agent:<name>`` (an agent step, ``params`` its input) or
    ``tool:<capability>`` (a tool call, ``params`` its parameters), and its context."""

    action: str
    #: ``agent`` or ``tool``; derived from ``action`` when left empty.
    kind: str = ""
    workflow: str = ""
    node: str = ""
    tenant: str = ""
    #: The tenant's IANA zone: windows with ``zone: tenant`` are read in it.
    tenant_time_zone: str = "UTC"
    agent: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Spent so far, by ceiling scope (``run``, ``workflow_day``, ...), in the policy's currency.
    spend: Mapping[str, Decimal] = field(default_factory=dict)
    run_id: int | None = None

    def __post_init__(self) -> None:
        kind, colon, name = self.action.partition(":")
        if not colon or kind not in KINDS or not name:
            raise ValueError(
                f"action {self.action!r} must be 'agent:<name>' or 'tool:<capability>'"
            )
        if not self.kind:
            object.__setattr__(self, "kind", kind)
        elif self.kind != kind:
            raise ValueError(f"kind {self.kind!r} does not fit action {self.action!r}")
        if zone_get(self.tenant_time_zone) is None:
            raise ValueError(f"tenant_time_zone {self.tenant_time_zone!r} is not an IANA time zone")
        unknown = set(self.spend) - set(SCOPES)
        if unknown:
            raise ValueError(
                f"spend has unknown scopes {sorted(unknown)}; scopes: {', '.join(SCOPES)}"
            )

    def to_json(self) -> dict[str, Any]:
        """The facts as JSON values (amounts of spend as strings, so they stay exact)."""
        return {
            "action": self.action,
            "kind": self.kind,
            "workflow": self.workflow,
            "node": self.node,
            "tenant": self.tenant,
            "tenant_time_zone": self.tenant_time_zone,
            "agent": self.agent,
            "params": dict(self.params),
            "spend": {scope: str(amount) for scope, amount in self.spend.items()},
            "run_id": self.run_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Facts:
        """Facts as :meth:`to_json` wrote them; ValueError if they cannot be read back."""
        try:
            spend = {
                scope: Decimal(str(amount)) for scope, amount in (data.get("spend") or {}).items()
            }
        except (InvalidOperation, AttributeError) as exc:
            raise ValueError(f"spend cannot be read: {exc}") from None
        params = data.get("params") or {}
        if not isinstance(params, Mapping):
            raise ValueError("params must be an object")
        run_id = data.get("run_id")
        return cls(
            action=str(data.get("action") or ""),
            kind=str(data.get("kind") or ""),
            workflow=str(data.get("workflow") or ""),
            node=str(data.get("node") or ""),
            tenant=str(data.get("tenant") or ""),
            tenant_time_zone=str(data.get("tenant_time_zone") or "UTC"),
            agent=str(data.get("agent") or ""),
            params=params,
            spend=spend,
            run_id=int(run_id) if run_id is not None else None,
        )
