"""What the database can store, decided before a write (no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from orchestration.payloads import (
    MAX_JSON_DEPTH,
    datetime_refusal,
    payload_refusal,
    text_refusal,
)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        10**40,  # jsonb's numeric holds it
        -1.5,
        "",
        "ünïcödé ✓ 🚀",
        [],
        {},
        {"a": [1, 2.5, None, False, {"b": "c"}]},
        ("tuples", "are", "lists"),
    ],
)
def test_json_values_are_storable(value: Any) -> None:
    assert payload_refusal(value) is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("a\x00b", "NUL"),
        ({"a": [{"b": "x\x00"}]}, "at a[0].b: contains a NUL"),
        ({"ok": 1, "k\x00": 2}, "at the top: a key contains a NUL"),
        ({"nested": {"k\x00": 2}}, "at nested: a key contains a NUL"),
        ({"s": "\ud800"}, "at s: contains a lone surrogate ('\\ud800')"),
        ({"n": float("nan")}, "at n: nan is not a JSON number"),
        ([float("inf")], "at [0]: inf is not a JSON number"),
        ({"n": -float("inf")}, "-inf"),
        ({1: "x"}, "the key 1 is not a string"),
        ({"when": datetime(2025, 1, 1)}, "at when: a datetime is not a JSON value"),
        ({"set": {1, 2}}, "a set is not a JSON value"),
    ],
)
def test_what_postgresql_refuses_is_named_with_where_it_is(value: Any, says: str) -> None:
    refusal = payload_refusal(value)
    assert refusal is not None and says in refusal, refusal


def test_depth_is_bounded_without_exhausting_the_stack() -> None:
    at_limit: Any = "x"
    for _ in range(MAX_JSON_DEPTH):
        at_limit = [at_limit]
    assert payload_refusal(at_limit) is None
    assert "nested more than" in (payload_refusal([at_limit]) or "")
    very_deep: Any = {}
    for _ in range(100_000):  # far past Python's recursion limit
        very_deep = {"d": very_deep}
    assert "nested more than" in (payload_refusal(very_deep) or "")


def test_text() -> None:
    assert text_refusal("plain") is None
    assert "NUL" in (text_refusal("\x00") or "")
    assert "surrogate" in (text_refusal("\udfff") or "")


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (datetime(2025, 1, 1, tzinfo=UTC), False),
        (datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=15, minutes=59))), False),
        (datetime(2025, 1, 1, tzinfo=timezone(-timedelta(hours=15, minutes=59))), False),
        (datetime(2025, 1, 1, tzinfo=timezone(timedelta(hours=16))), True),
        (datetime(2025, 1, 1, tzinfo=timezone(-timedelta(hours=16))), True),
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))), True),
        (datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=10))), True),
    ],
)
def test_datetimes(value: datetime, refused: bool) -> None:
    assert (datetime_refusal(value) is not None) is refused
