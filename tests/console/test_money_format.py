"""Amounts of money as the console shows them: a sub-cent ceiling does not read as 0.00."""

from __future__ import annotations

from decimal import Decimal

import pytest

from console.templatetags.console_tags import money


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (Decimal("0.0015"), "0.0015"),
        (Decimal("0.000915"), "0.000915"),
        (Decimal("0.05"), "0.05"),
        (Decimal("0.5"), "0.50"),
        (Decimal("0"), "0.00"),
        (Decimal("1234.5"), "1,234.50"),
        (2.0, "2.00"),
        ("n/a", "n/a"),
    ],
)
def test_money_keeps_the_digits_that_matter(value: object, shown: str) -> None:
    assert money(value) == shown
