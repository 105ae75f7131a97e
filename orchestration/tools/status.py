"""What operators see of the tool layer: every capability, its providers, their recent health,
rate-limit headroom and circuit state (as every worker sees them)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Count, Q
from django.utils import timezone

from orchestration.models import ToolCall, ToolCallStatus
from orchestration.tools import limits
from orchestration.tools.registry import capability_list

#: Health is the share of successful attempts over this window.
HEALTH_WINDOW = timedelta(hours=1)


def capability_status_list() -> list[dict[str, Any]]:
    """Capabilities with their providers' live state; one query for recent attempts."""
    since = timezone.now() - HEALTH_WINDOW
    recent = {
        row["provider"]: row
        for row in ToolCall.objects.filter(created_at__gte=since)
        .values("provider")
        .annotate(
            attempts=Count("id"), succeeded=Count("id", filter=Q(status=ToolCallStatus.SUCCEEDED))
        )
    }
    out = []
    for capability in capability_list():
        described = capability.describe()
        for provider, entry in zip(
            capability.providers_in_order(), described["providers"], strict=True
        ):
            counts = recent.get(provider.name, {"attempts": 0, "succeeded": 0})
            room = limits.headroom(provider)
            circuit = limits.breaker.state(provider)
            entry["health"] = {
                "window_seconds": int(HEALTH_WINDOW.total_seconds()),
                "attempts": counts["attempts"],
                "succeeded": counts["succeeded"],
                "success_rate": round(counts["succeeded"] / counts["attempts"], 3)
                if counts["attempts"]
                else None,
            }
            entry["headroom"] = (
                {
                    "tokens": round(room.tokens, 2),
                    "burst": room.burst,
                    "per_second": room.per_second,
                }
                if room
                else None
            )
            entry["circuit"] = {
                "state": circuit.state,
                "calls": circuit.calls,
                "failures": circuit.failures,
                "probe_after": circuit.probe_after,
            }
        out.append(described)
    return out
