"""``{% when value %}``: a time relative to now, with the exact time in the user's zone."""

from __future__ import annotations

from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()


def relative(value: datetime, now: datetime) -> str:
    seconds = int((now - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 45:
        return "just now" if not future else "in a moment"
    for size, unit in ((86400 * 365, "y"), (86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size * 0.75 or unit == "min":
            amount = max(1, round(seconds / size))
            text = f"{amount} {unit}"
            return f"in {text}" if future else f"{text} ago"
    raise AssertionError("unreachable")


@register.simple_tag
def when(value: datetime | None) -> SafeString | str:
    """``<time datetime="ISO" title="exact time in the user's zone">3 min ago</time>``."""
    if value is None:
        return "—"
    local = timezone.localtime(value)
    return format_html(
        '<time datetime="{}" title="{}">{}</time>',
        value.isoformat(),
        local.strftime("%Y-%m-%d %H:%M:%S %Z"),
        relative(value, timezone.now()),
    )
