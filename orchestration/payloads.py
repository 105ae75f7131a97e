"""What the database can store: one check for every value bound for a ``jsonb`` or text column.

PostgreSQL refuses a NUL character (``\\u0000``) in ``text`` and in ``jsonb``, ``jsonb`` refuses
``NaN`` and ``Infinity``, and a lone UTF-16 surrogate (``\\ud800``) cannot be encoded for it at
all; SQLite accepts some of these and then fails later, when the value is read or compared. A
time-zone offset beyond ±15:59 makes PostgreSQL refuse a timestamp, and an offset that moves
a timestamp out of Python's year range breaks both databases. Values from outside (the API,
agents' outputs) are checked here before a write, so the refusal names the value, not the
driver's error.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

#: Deeper JSON is refused: serialising it again (for the database, digests, the audit log)
#: runs into Python's recursion limit long before PostgreSQL's own limit.
MAX_JSON_DEPTH = 100

#: PostgreSQL's limit for a time-zone offset in a timestamp it is given.
MAX_UTC_OFFSET = timedelta(hours=15, minutes=59)


def text_refusal(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None if it can."""
    if "\x00" in value:
        return "contains a NUL character (\\u0000), which cannot be stored"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate ({value[exc.start]!a}), which is not a Unicode "
            "character and cannot be stored"
        )
    return None


def payload_refusal(value: Any) -> str | None:
    """Why ``value`` cannot be stored as JSON (``jsonb``), naming where in it (``at
    items[2].name: ...``), or None if it can.

    JSON here is what ``json.loads`` returns: dicts with string keys, lists, strings, finite
    numbers, booleans and None (tuples pass as lists). Iterative, so a deep value cannot
    exhaust the stack of the check itself."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        where, item, depth = stack.pop()
        reason = _scalar_refusal(item)
        if reason is None and isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                reason = f"is nested more than {MAX_JSON_DEPTH} levels deep"
            elif isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"at {where or 'the top'}: the key {key!r} is not a string"
                    if (key_reason := text_refusal(key)) is not None:
                        return f"at {where or 'the top'}: a key {key_reason}"
                    stack.append((f"{where}.{key}" if where else key, child, depth + 1))
            else:
                stack.extend(
                    (f"{where}[{index}]", child, depth + 1) for index, child in enumerate(item)
                )
        if reason is not None:
            return f"at {where}: {reason}" if where else reason
    return None


def _scalar_refusal(item: Any) -> str | None:
    if item is None or isinstance(item, bool | int | dict | list | tuple):
        return None
    if isinstance(item, float):
        return None if math.isfinite(item) else f"{item} is not a JSON number"
    if isinstance(item, str):
        return text_refusal(item)
    return f"a {type(item).__name__} is not a JSON value"


def datetime_refusal(value: datetime) -> str | None:
    """Why an aware ``value`` cannot be stored as a timestamp, or None if it can."""
    offset = value.utcoffset()
    if offset is not None and abs(offset) > MAX_UTC_OFFSET:
        return "has a time-zone offset beyond ±15:59"
    try:
        value.astimezone(UTC)
    except OverflowError:
        return "is out of range once converted to UTC"
    return None


def payload_size(value: Any) -> int:
    """How many bytes ``value`` takes as compact JSON: what the payload limit counts."""
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())
