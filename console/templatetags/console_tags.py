"""Small presentation helpers for the console's templates: UTC times, JSON, durations."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from console.templatetags.console_time import when

register = template.Library()

PREVIEW_CHARS = 80


@register.simple_tag
def utc_time(value: datetime | None) -> SafeString | str:
    """``<time>`` in the user's zone (UTC unless they chose one), the exact ISO timestamp as its
    title."""
    if value is None:
        return "—"
    value = timezone.localtime(value.astimezone(UTC))
    iso = value.isoformat()
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        iso,
        iso,
        value.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


@register.simple_tag
def duration(start: datetime | None, end: datetime | None) -> str:
    """How long between two times, for people: ``850 ms``, ``4.2 s``, ``3m 05s``."""
    if start is None or end is None:
        return "—"
    seconds = (end - start).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.filter
def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


@register.filter
def json_preview(value: Any) -> str:
    """One line of compact JSON, cut to a preview (the full value is in the title)."""
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    )
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


@register.filter
def json_compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


@register.simple_tag
def relative_time(value: datetime | None) -> SafeString | str:
    """``{% when %}`` (console_time) under its older name: "3 min ago" or "just now", not
    "0 minutes ago", with the exact time in the user's zone on hover."""
    return when(value)
